"""Hot reload: which keys a running proxy can take from an edited config, and how.

A reload (SIGHUP, or `sip700 reload`) validates the whole file first (the same checks as
`check-config`, bindings file included); an invalid file changes nothing. A valid one takes
effect for new calls in every worker; a call in progress keeps what it was set up with (its
transactions hold their gateway, its dialog token holds its rule). Keys that name sockets or
processes cannot change in a running proxy: the new file's values for them are ignored, and named
in the log (`restart_required`), until the next start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from proxy.config import Config, ConfigError, load_config, load_config_text

# (section, key) pairs that only a restart applies; None as key: the whole section
RESTART_ONLY: tuple[tuple[str, str | None], ...] = (
    ("listen", None),
    ("advertise", None),
    ("workers", None),
    ("worker_cpu_affinity", None),
    ("transport", None),
    ("metrics", None),
    ("logging", None),
    ("runtime_dir", None),
    ("store", "backend"),
    ("store", "redis_url"),
    ("store", "key_prefix"),
    ("store", "sentinel"),
    ("store", "cluster"),
    ("store", "timeout_ms"),
    ("store", "cache"),
    ("store", "circuit_breaker"),
    ("privacy", "dialog_key"),
    ("privacy", "dialog_key_file"),
)
# what a reload applies: everything else, i.e. carrier, trusted_peers, allowed_next_hops, overload,
# middle_number_pattern, responses, privacy (but the key), timers, store.lookup_deadline_ms,
# store.retry_after_s, store.bindings_file (re-read on every reload), shutdown, health
MAX_WARNED_X = 10


def _value(cfg: Config, section: str, key: str | None) -> Any:
    value = getattr(cfg, section)
    if key is not None:
        value = getattr(value, key)
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    return value


def restart_required(running: Config, new: Config) -> list[str]:
    """Keys whose new value needs a restart (`workers`, `store.redis_url` …)."""
    return [section if key is None else f"{section}.{key}"
            for section, key in RESTART_ONLY
            if _value(running, section, key) != _value(new, section, key)]


def effective_config(running: Config, new: Config, base_dir: Any) -> Config:
    """`new`, with the running values of every restart-only key."""
    if not restart_required(running, new):
        return new
    data = new.model_dump()
    old = running.model_dump()
    for section, key in RESTART_ONLY:
        if key is None:
            data[section] = old[section]
        else:
            data[section][key] = old[section][key]
    return Config.model_validate(data, context={"base_dir": base_dir})


@dataclass
class BindingsCheck:
    """What the memory store's bindings file gives: the loaded store, rows skipped, warnings."""

    store: Any = None
    loaded: int = 0
    problems: list[str] = field(default_factory=list)  # rows skipped (file:line: why)
    warnings: list[str] = field(default_factory=list)  # X that no call can reach
    fatal: str | None = None  # the file gives nothing to route with

    @property
    def ok(self) -> bool:
        return self.fatal is None


def check_bindings_file(cfg: Config) -> BindingsCheck:
    """Load `store.bindings_file` (memory backend) as the proxy would, and judge it.

    A file that loads no binding at all (a YAML error in the wrong place drops every row) is
    fatal; skipped rows are problems; an X that `middle_number_pattern` never matches is a
    warning (no call can ever reach it: a pattern or a number is wrong).
    """
    result = BindingsCheck()
    path = cfg.store.bindings_file
    if cfg.store.backend != "memory" or path is None:
        return result
    from proxy.bindings.memory import MemoryStore

    store = MemoryStore()
    loaded, problems = store.load_file(path)
    result.store, result.loaded = store, loaded
    result.problems = [str(p) for p in problems]
    if loaded == 0 and (problems or cfg.api.listen is None):
        # an empty file is fine when the binding API fills the store (api.listen); a file
        # whose every row was skipped never is
        why = f"{len(problems)} row(s) skipped, see above" if problems else "it lists none"
        result.fatal = (f"{path}: store.bindings_file loads no binding ({why}); the proxy "
                        "would refuse every call")
    elif loaded == 0:
        result.warnings.append(f"{path}: no binding yet: the binding API (api.listen) makes "
                               "them")
    pattern = cfg.middle_number_regex
    unreachable = sorted(x for x in store_xs(store) if pattern.search(x) is None)
    for x in unreachable[:MAX_WARNED_X]:
        result.warnings.append(
            f"{path}: x {x} never matches middle_number_pattern "
            f"{cfg.middle_number_pattern!r}: no call can reach it")
    if len(unreachable) > MAX_WARNED_X:
        result.warnings.append(f"{path}: {len(unreachable) - MAX_WARNED_X} more X like these")
    return result


def store_xs(store: Any) -> list[str]:
    """Every X the memory store holds a binding for."""
    by_x = getattr(store, "_by_x", None)  # the memory store's index; no public listing of X
    return list(by_x) if by_x is not None else []


def validate_file(path: str, text: str | None = None) -> tuple[Config | None, BindingsCheck,
                                                              list[str]]:
    """The config at `path` (or `text` read from it) and its bindings file, checked as a
    start or a reload would: (config or None, bindings check, problems)."""
    try:
        cfg = load_config(path) if text is None else load_config_text(text, path)
    except ConfigError as exc:
        return None, BindingsCheck(), list(exc.problems)
    check = check_bindings_file(cfg)
    problems = [] if check.ok else [*check.problems, check.fatal or ""]
    if check.ok:  # the file is sound: do its gateway names resolve?
        from proxy.worker import gateway_name_problems

        problems = [f"{path}: {p}" for p in gateway_name_problems(cfg)]
        if problems:
            return None, check, problems
    return (cfg if check.ok else None), check, problems


class GatewayMemory:
    """Gateways a reload removed stay known for in-dialog requests until their calls can have
    ended (`privacy.max_dialog_s` after the reload): their BYE still comes from, and goes to,
    the gateway the call was set up on."""

    def __init__(self) -> None:
        self._retired: dict[str, float] = {}  # host → wall-clock time it is forgotten

    def retire(self, old: Config, new: Config, now: float | None = None) -> None:
        now = time.time() if now is None else now
        kept = {t.host for t in new.carrier.targets}
        until = now + old.privacy.max_dialog_s
        for target in old.carrier.targets:
            if target.host not in kept:
                self._retired[target.host] = until
        for host in kept:
            self._retired.pop(host, None)

    def hosts(self, now: float | None = None) -> frozenset[str]:
        now = time.time() if now is None else now
        for host in [h for h, until in self._retired.items() if until <= now]:
            del self._retired[host]
        return frozenset(self._retired)
