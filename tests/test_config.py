"""Tests for proxy.config: the example files load, and every bad edit is named precisely."""

from __future__ import annotations

import base64
import copy
import ipaddress
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from proxy.config import (
    Config,
    ConfigError,
    HostPort,
    ListenEndpoint,
    SipTarget,
    available_cpus,
    check_config,
    load_config,
    parse_listen,
    parse_sip_uri,
    plan_worker_cpus,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
KEY_B64 = base64.b64encode(bytes(range(32))).decode()

MINIMAL: dict[str, Any] = {
    "carrier": {"gateways": ["sip:127.0.0.1:5090"]},
    "store": {"backend": "memory", "bindings_file": "bindings.yaml"},
}


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "bindings.yaml").write_text("bindings: []\n")
    return tmp_path


def write(directory: Path, data: dict[str, Any] | str, name: str = "proxy.yaml") -> Path:
    path = directory / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def problems_for(directory: Path, **changes: Any) -> tuple[str, list[str]]:
    """The file name and the problems of MINIMAL with some top-level keys replaced."""
    data = copy.deepcopy(MINIMAL)
    data.update(changes)
    path = write(directory, data)
    return str(path), check_config(path)


# --- the shipped examples -------------------------------------------------------------------


def test_default_example_loads_with_documented_values() -> None:
    config = load_config(CONFIG_DIR / "proxy.yaml")
    assert config.listen_endpoints == (
        ListenEndpoint("udp", "127.0.0.1", 5060),
        ListenEndpoint("tcp", "127.0.0.1", 5060),
    )
    assert config.advertised == HostPort("127.0.0.1", 5060)
    assert config.trusted_networks == (ipaddress.ip_network("127.0.0.1/32"),)
    assert config.carrier.targets == (SipTarget("sip", "127.0.0.1", 5090, "udp", ()),)
    assert config.store.backend == "memory"
    assert config.store.bindings_file == (CONFIG_DIR / "bindings.yaml").resolve()
    assert config.middle_number_regex.fullmatch("700100000000001")
    assert not config.middle_number_regex.fullmatch("13800000001")
    assert config.responses.store_unavailable.code == 503
    assert config.privacy.dialog_key_bytes is None


def test_redis_example_loads() -> None:
    config = load_config(CONFIG_DIR / "proxy-redis.yaml")
    assert config.store.backend == "redis"
    assert config.store.redis_url == "redis://127.0.0.1:6379/0"
    assert config.store.bindings_file is None
    assert config.metrics.endpoint == HostPort("127.0.0.1", 9100)
    assert check_config(CONFIG_DIR / "proxy-redis.yaml") == []


def test_example_bindings_file_has_axb_and_axn_entries() -> None:
    bindings = yaml.safe_load((CONFIG_DIR / "bindings.yaml").read_text())["bindings"]
    assert {b["type"] for b in bindings} == {"axb", "axn"}
    assert sum(b["type"] == "axn" for b in bindings) == 1
    for binding in bindings:
        assert set(binding) == {"type", "x", "a", "b", "ttl"}
        assert all(isinstance(binding[k], str) for k in ("x", "a", "b"))
        assert load_config(CONFIG_DIR / "proxy.yaml").middle_number_regex.fullmatch(binding["x"])


def test_example_proxy_yaml_sets_every_key_of_the_schema() -> None:
    """proxy.yaml is the commented reference: it must not drift from the schema."""
    data = yaml.safe_load((CONFIG_DIR / "proxy.yaml").read_text())
    documented = set(data) | {"advertise"}  # advertise is shown commented out
    assert documented == set(Config.model_fields)


def test_minimal_config_takes_defaults(config_dir: Path) -> None:
    config = load_config(write(config_dir, MINIMAL))
    assert config.workers == (os.cpu_count() or 1)  # "auto"
    assert config.timers.t1_ms == 500
    assert config.store.key_prefix == "sip700:"
    assert config.trusted_peers == ("127.0.0.1/32",)
    assert config.metrics.endpoint is None


def test_relative_bindings_file_resolves_against_config_dir(
    config_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(config_dir, MINIMAL)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert load_config(path).store.bindings_file == (config_dir / "bindings.yaml").resolve()


def test_config_is_frozen(config_dir: Path) -> None:
    config = load_config(write(config_dir, MINIMAL))
    with pytest.raises(ValidationError):
        config.workers = 4  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.store.timeout_ms = 1  # type: ignore[misc]


def test_null_section_means_defaults(config_dir: Path) -> None:
    path = write(config_dir, yaml.safe_dump(MINIMAL) + "metrics:\ntimers:\n")
    config = load_config(path)
    assert config.metrics.listen is None
    assert config.timers.t2_ms == 4000


# --- unknown keys and types -----------------------------------------------------------------


def test_unknown_top_level_key_is_named_with_suggestion(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, wrokers=2)
    assert problems == [f"{shown}: wrokers: unknown key (did you mean 'workers'?)"]


def test_unknown_nested_key_is_named(config_dir: Path) -> None:
    shown, problems = problems_for(
        config_dir, store={**MINIMAL["store"], "cache": {"max_entrys": 5, "zzz": 1}}
    )
    assert problems == [
        f"{shown}: store.cache.max_entrys: unknown key (did you mean 'max_entries'?)",
        f"{shown}: store.cache.zzz: unknown key",
    ]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"workers": "many"}, "workers: must be a valid integer (got 'many')"),
        ({"workers": True}, "workers: must be a valid integer (got true)"),
        ({"trusted_peers": "127.0.0.1/32"}, "trusted_peers: must be a list (got '127.0.0.1/32')"),
        ({"timers": [1, 2]}, "timers: must be a mapping (got a list)"),
        ({"timers": {"timer_c_s": "3"}}, "timers.timer_c_s: must be a valid number (got '3')"),
        (
            {"privacy": {"mask_numbers_in_logs": "no"}},
            "privacy.mask_numbers_in_logs: must be a valid boolean (got 'no')",
        ),
        (
            {"logging": {"level": "INFO"}},
            "logging.level: must be 'debug', 'info', 'warning' or 'error' (got 'INFO')",
        ),
    ],
)
def test_wrong_type_names_key_and_value(
    config_dir: Path, changes: dict[str, Any], expected: str
) -> None:
    shown, problems = problems_for(config_dir, **changes)
    assert problems == [f"{shown}: {expected}"]


# --- addresses ------------------------------------------------------------------------------


def test_bad_cidr(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, trusted_peers=["10.0.0.0/8", "10.0.0.0/33"])
    assert problems == [
        f"{shown}: trusted_peers[1]: not an IPv4/IPv6 network in CIDR form ('10.0.0.0/33')"
    ]


def test_trusted_peers_accept_ipv6_and_mapped_ipv4(config_dir: Path) -> None:
    config = load_config(
        write(config_dir, {**MINIMAL, "trusted_peers": ["10.1.0.0/16", "fd00::/8"]})
    )
    assert config.is_trusted("10.1.2.3")
    assert config.is_trusted("::ffff:10.1.2.3")  # dual-stack socket view of an IPv4 peer
    assert config.is_trusted("fd00::1")
    assert not config.is_trusted("10.2.0.1")
    assert not config.is_trusted("not an ip")


def test_bad_regex(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, middle_number_pattern=r"^700(\d{12}$")
    assert len(problems) == 1
    assert problems[0].startswith(f"{shown}: middle_number_pattern: not a valid regular expression")
    assert problems[0].endswith(r"('^700(\d{12}$')")


def test_missing_gateways(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, carrier={"strategy": "failover"})
    assert problems == [f"{shown}: carrier.gateways: required key missing"]


def test_missing_carrier_section(config_dir: Path) -> None:
    path = write(config_dir, {"store": MINIMAL["store"]})
    assert check_config(path) == [f"{path}: carrier: required key missing"]


def test_empty_gateways(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, carrier={"gateways": []})
    assert problems == [f"{shown}: carrier.gateways: must not be empty"]


@pytest.mark.parametrize(
    ("uri", "what"),
    [
        ("http://x", "not a SIP URI"),
        ("127.0.0.1:5090", "not a SIP URI"),
        ("sip:gw@10.0.0.1", "a gateway URI has no user part"),
        ("sip:10.0.0.1:0", "port must be 1-65535"),
        ("sip:10.0.0.1:5060;transport=sctp", "transport must be udp, tcp or tls, not 'sctp'"),
        ("sip:::1", "an IPv6 address must be in brackets, e.g. [::1]"),
        ("sip:bad_host!", "not a host name or IP address: 'bad_host!'"),
        ("sips:10.0.0.1;transport=udp", "sips: is TLS, it cannot use transport=udp"),
    ],
)
def test_bad_gateway_uri(config_dir: Path, uri: str, what: str) -> None:
    shown, problems = problems_for(config_dir, carrier={"gateways": ["sip:127.0.0.1", uri]})
    assert problems == [f"{shown}: carrier.gateways[1]: {what} ('{uri}')"]


def test_duplicate_gateway(config_dir: Path) -> None:
    gateways = ["sip:10.0.0.1", "sip:10.0.0.1:5060;transport=udp"]
    shown, problems = problems_for(config_dir, carrier={"gateways": gateways})
    assert problems == [
        f"{shown}: carrier.gateways: duplicate entry 'sip:10.0.0.1:5060;transport=udp'"
        " (items 0 and 1)"
    ]


def test_parse_sip_uri_forms() -> None:
    assert parse_sip_uri("sip:[2001:db8::1]:5070;transport=TCP;lr") == SipTarget(
        "sip", "2001:db8::1", 5070, "tcp", (("transport", "TCP"), ("lr", None))
    )
    assert parse_sip_uri("SIP:gw.example.net") == SipTarget(
        "sip", "gw.example.net", 5060, "udp", ()
    )
    assert str(parse_sip_uri("sip:[::1]")) == "sip:[::1]:5060"
    # TLS: sips: or ;transport=tls, port 5061 unless given
    assert parse_sip_uri("sips:gw.example.net") == SipTarget(
        "sips", "gw.example.net", 5061, "tls", ())
    assert parse_sip_uri("sips:10.0.0.1:5071;transport=tcp").transport == "tls"
    assert parse_sip_uri("sip:10.0.0.1;transport=TLS")[2:4] == (5061, "tls")
    assert parse_sip_uri("sip:[::1]:5063;transport=tls")[2:4] == (5063, "tls")


@pytest.mark.parametrize(
    ("entry", "what"),
    [
        ("sctp:127.0.0.1:5060", "expected transport:host:port with transport udp, tcp or tls"),
        ("127.0.0.1:5060", "expected transport:host:port with transport udp, tcp or tls"),
        ("udp:127.0.0.1:70000", "port must be 1-65535"),
        ("udp:127.0.0.1:", "port must be 1-65535"),
        ("udp:::1:5060", "an IPv6 address must be in brackets, e.g. [::1]"),
        ("udp:[::1:5060", "unclosed '[' in IPv6 address"),
        ("tcp:300.1.1.1:5060", "not an IPv4 address: 300.1.1.1"),
    ],
)
def test_bad_listen_entry(config_dir: Path, entry: str, what: str) -> None:
    shown, problems = problems_for(config_dir, listen=["udp:127.0.0.1:5060", entry])
    assert problems == [f"{shown}: listen[1]: {what} ('{entry}')"]


def test_listen_forms() -> None:
    assert parse_listen("udp:[::1]:5062") == ListenEndpoint("udp", "::1", 5062)
    assert parse_listen("TCP:0.0.0.0") == ListenEndpoint("tcp", "0.0.0.0", 5060)
    assert str(parse_listen("udp:[::1]:5062")) == "udp:[::1]:5062"
    assert parse_listen("tls:127.0.0.1") == ListenEndpoint("tls", "127.0.0.1", 5061)


def test_listen_must_not_be_empty_or_repeated(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, listen=[])
    assert problems == [f"{shown}: listen: must not be empty"]
    shown, problems = problems_for(config_dir, listen=["udp:127.0.0.1:5060", "udp:127.0.0.1"])
    assert problems == [f"{shown}: listen: duplicate entry 'udp:127.0.0.1' (items 0 and 1)"]


def test_advertise_required_with_wildcard_listen(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, listen=["udp:0.0.0.0:5060"])
    assert problems == [
        f"{shown}: advertise: required when listen[0] binds a wildcard address"
        " ('udp:0.0.0.0:5060'): set the address peers should send to"
    ]
    shown, problems = problems_for(config_dir, listen=["udp:[::]:5060"], advertise="[::]")
    assert problems == [
        f"{shown}: advertise: must be an address peers can reach, not a wildcard ('[::]')"
    ]


def test_advertise_port_defaults_to_first_listen_port(config_dir: Path) -> None:
    data = {**MINIMAL, "listen": ["udp:0.0.0.0:5070"], "advertise": "sip.example.net"}
    assert load_config(write(config_dir, data)).advertised == HostPort("sip.example.net", 5070)
    data["advertise"] = "[2001:db8::5]:5080"
    assert load_config(write(config_dir, data)).advertised == HostPort("2001:db8::5", 5080)


# --- store ----------------------------------------------------------------------------------


def test_bindings_file_required_for_memory_backend(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, store={"backend": "memory"})
    assert problems == [f"{shown}: store.bindings_file: required when store.backend is memory"]


def test_missing_store_section_names_bindings_file(config_dir: Path) -> None:
    path = write(config_dir, {"carrier": MINIMAL["carrier"]})
    assert check_config(path) == [
        f"{path}: store.bindings_file: required when store.backend is memory"
    ]


def test_bindings_file_must_exist(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, store={"bindings_file": "missing.yaml"})
    assert problems == [
        f"{shown}: store.bindings_file: no such file ('missing.yaml',"
        f" looked for '{config_dir / 'missing.yaml'}')"
    ]


def test_redis_only_keys_refused_with_memory_and_vice_versa(config_dir: Path) -> None:
    sentinel = {"addresses": ["127.0.0.1:26379"], "service_name": "mymaster"}
    shown, problems = problems_for(config_dir, store={**MINIMAL["store"], "sentinel": sentinel})
    assert problems == [f"{shown}: store.sentinel: only used with store.backend redis"]
    shown, problems = problems_for(config_dir, store={**MINIMAL["store"], "backend": "redis"})
    assert problems == [
        f"{shown}: store.bindings_file: only used with store.backend memory;"
        " remove it or change backend"
    ]


def test_redis_sentinel_and_cluster_are_exclusive(config_dir: Path) -> None:
    store = {
        "backend": "redis",
        "sentinel": {"addresses": ["127.0.0.1:26379"], "service_name": "mymaster"},
        "cluster": {"startup_nodes": ["127.0.0.1:7000"]},
    }
    shown, problems = problems_for(config_dir, store=store)
    assert problems == [
        f"{shown}: store.cluster: cannot be combined with store.sentinel; choose one"
    ]
    del store["sentinel"]
    config = load_config(write(config_dir, {**MINIMAL, "store": store}))
    assert config.store.cluster is not None
    assert config.store.cluster.endpoints == (HostPort("127.0.0.1", 7000),)


def test_redis_url_checked_and_password_hidden(config_dir: Path) -> None:
    store = {"backend": "redis", "redis_url": "http://user:s3cret@127.0.0.1:6379/0"}
    shown, problems = problems_for(config_dir, store=store)
    assert problems == [
        f"{shown}: store.redis_url: scheme must be redis://, rediss:// or unix://"
        " ('http://user:***@127.0.0.1:6379/0')"
    ]
    store["redis_url"] = "rediss://:pw@redis.example.net:6380/2"
    assert load_config(write(config_dir, {**MINIMAL, "store": store})).store.redis_url.endswith(
        "/2"
    )


def test_sentinel_entries_need_host_and_port(config_dir: Path) -> None:
    store = {"backend": "redis", "sentinel": {"addresses": ["redis-1"], "service_name": "m"}}
    shown, problems = problems_for(config_dir, store=store)
    assert problems == [f"{shown}: store.sentinel.addresses[0]: expected host:port ('redis-1')"]


# --- privacy key ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("not base64!!", "not valid base64 (value hidden)"),
        (
            base64.b64encode(b"x" * 16).decode(),
            "decodes to 16 bytes, need 32 (value hidden); make one with: openssl rand -base64 32",
        ),
    ],
)
def test_bad_dialog_key_is_reported_without_the_key(config_dir: Path, key: str, what: str) -> None:
    shown, problems = problems_for(config_dir, privacy={"dialog_key": key})
    assert problems == [f"{shown}: privacy.dialog_key: {what}"]
    assert key not in problems[0]


def test_dialog_key_of_wrong_type_is_hidden(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, privacy={"dialog_key": 123456})
    assert problems == [f"{shown}: privacy.dialog_key: must be a valid string (got hidden)"]


def test_dialog_key_inline_and_from_file(config_dir: Path) -> None:
    config = load_config(write(config_dir, {**MINIMAL, "privacy": {"dialog_key": KEY_B64}}))
    assert config.privacy.dialog_key_bytes == bytes(range(32))
    assert KEY_B64 not in repr(config)  # SecretStr keeps it out of reprs and logs
    (config_dir / "dialog.key").write_text(KEY_B64 + "\n")
    config = load_config(
        write(config_dir, {**MINIMAL, "privacy": {"dialog_key_file": "dialog.key"}})
    )
    assert config.privacy.dialog_key_bytes == bytes(range(32))


def test_dialog_key_file_problems(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, privacy={"dialog_key_file": "nope.key"})
    assert problems == [
        f"{shown}: privacy.dialog_key_file: cannot read '{config_dir / 'nope.key'}':"
        " No such file or directory"
    ]
    (config_dir / "short.key").write_text("c2hvcnQ=\n")
    shown, problems = problems_for(config_dir, privacy={"dialog_key_file": "short.key"})
    assert problems == [
        f"{shown}: privacy.dialog_key_file: '{config_dir / 'short.key'}': decodes to 5 bytes,"
        " need 32 (value hidden); make one with: openssl rand -base64 32"
    ]
    privacy = {"dialog_key": KEY_B64, "dialog_key_file": "short.key"}
    shown, problems = problems_for(config_dir, privacy=privacy)
    assert problems == [
        f"{shown}: privacy.dialog_key_file: set privacy.dialog_key or privacy.dialog_key_file,"
        " not both"
    ]


# --- ranges ---------------------------------------------------------------------------------


def test_timer_ranges(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, timers={"t1_ms": 5000, "t4_ms": 0})
    assert problems == [
        f"{shown}: timers.t2_ms: must be >= timers.t1_ms (4000 < 5000)",
        f"{shown}: timers.t4_ms: must be greater than 0 (got 0)",
    ]
    config = load_config(write(config_dir, {**MINIMAL, "timers": {"timer_c_s": 0.5}}))
    assert config.timers.timer_c_s == 0.5  # small timer C is allowed for tests


def test_trying_after_ms_is_0_to_200(config_dir: Path) -> None:
    assert load_config(write(config_dir, MINIMAL)).timers.trying_after_ms == 200
    for value in (0, 200):
        config = load_config(write(config_dir, {**MINIMAL, "timers": {"trying_after_ms": value}}))
        assert config.timers.trying_after_ms == value
    shown, problems = problems_for(config_dir, timers={"trying_after_ms": 201})
    assert problems == [f"{shown}: timers.trying_after_ms: must be less than or equal to 200 "
                        "(got 201)"]
    shown, problems = problems_for(config_dir, timers={"trying_after_ms": -1})
    assert problems == [f"{shown}: timers.trying_after_ms: must be greater than or equal to 0 "
                        "(got -1)"]
    shown, problems = problems_for(config_dir, timers={"trying_after_ms": 0.5})
    assert problems == [f"{shown}: timers.trying_after_ms: must be a valid integer (got 0.5)"]


def test_response_code_and_reason(config_dir: Path) -> None:
    responses = {
        "no_binding": {"code": 200, "reason": "OK"},
        "not_party": {"code": 403, "reason": "Bad\r\nX-Injected: 1"},
        "untrusted_peer": {"code": 700, "reason": "Nope"},
    }
    shown, problems = problems_for(config_dir, responses=responses)
    assert problems == [
        f"{shown}: responses.no_binding.code: must be greater than or equal to 300 (got 200)",
        f"{shown}: responses.not_party.reason: reason must not contain control characters or"
        " line breaks ('Bad\\r\\nX-Injected: 1')",
        f"{shown}: responses.untrusted_peer.code: must be less than or equal to 699 (got 700)",
    ]


def test_cache_negative_ttl_within_max(config_dir: Path) -> None:
    store = {**MINIMAL["store"], "cache": {"max_ttl_s": 1, "negative_ttl_s": 2}}
    shown, problems = problems_for(config_dir, store=store)
    assert problems == [
        f"{shown}: store.cache.negative_ttl_s: must not exceed store.cache.max_ttl_s (2.0 > 1.0)"
    ]


def test_metrics_listen_needs_port(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, metrics={"listen": "9100"})
    assert problems == [f"{shown}: metrics.listen: expected host:port ('9100')"]


# --- whole-file problems --------------------------------------------------------------------


def test_yaml_syntax_error_names_line_and_column(config_dir: Path) -> None:
    path = write(config_dir, "workers: 1\nlisten: [udp:127.0.0.1:5060\ncarrier: {}\n")
    problems = check_config(path)
    assert problems == [
        f"{path}: line 3, column 8: did not find expected ',' or ']'"
        " (while parsing a flow sequence at line 2)"
    ]


def test_yaml_bad_indentation(config_dir: Path) -> None:
    path = write(config_dir, "carrier:\n  gateways: []\n strategy: failover\n")
    [problem] = check_config(path)
    assert problem.startswith(f"{path}: line 3, column 2: ")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_document(config_dir: Path, text: str) -> None:
    path = write(config_dir, text)
    assert check_config(path) == [
        f"{path}: the file is empty; expected a mapping of settings (see proxy.yaml)"
    ]


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- udp:127.0.0.1:5060\n", "a list"), ("just words\n", "a single value ('just words')")],
)
def test_non_mapping_document(config_dir: Path, text: str, kind: str) -> None:
    path = write(config_dir, text)
    assert check_config(path) == [f"{path}: the document is {kind}; expected a mapping of settings"]


def test_duplicate_keys_reported_with_lines(config_dir: Path) -> None:
    text = yaml.safe_dump(MINIMAL) + "workers: 2\nworkers: 3\n"
    path = write(config_dir, text)
    line = text.count("\n")
    assert check_config(path) == [
        f"{path}: line {line}, column 1: duplicate key 'workers' (first at line {line - 1})"
    ]


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert check_config(path) == [f"{path}: cannot read: No such file or directory"]


def test_several_problems_reported_at_once(config_dir: Path) -> None:
    path = write(
        config_dir,
        {
            "listen": ["udp:127.0.0.1:5060", "sctp:127.0.0.1:5060"],
            "trusted_peers": ["10.0.0.0/40"],
            "carrier": {"gateways": ["http://x"], "stratgy": "failover"},
            "middle_number_pattern": "(",
            "store": {"backend": "memory"},
            "privacy": {"dialog_key": "short"},
            "timers": {"t1_ms": -1},
            "workers": 0,
            "bogus": 1,
        },
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = caught.value.problems
    keys = [p.removeprefix(f"{path}: ").split(":")[0] for p in problems]
    assert keys == [
        "listen[1]",
        "trusted_peers[0]",
        "carrier.gateways[0]",
        "carrier.stratgy",
        "middle_number_pattern",
        "store.bindings_file",
        "privacy.dialog_key",
        "timers.t1_ms",
        "workers",
        "bogus",
    ]
    assert str(caught.value) == "\n".join(problems)
    assert check_config(path) == problems


def test_workers_auto_means_one_per_core(config_dir: Path) -> None:
    path = write(config_dir, {**MINIMAL, "workers": "auto"})
    assert load_config(path).workers == available_cpus()


# --- each worker's own port -----------------------------------------------------------------


def test_worker_ports_follow_the_first_listen_port_by_default(config_dir: Path) -> None:
    config = load_config(write(config_dir, {**MINIMAL, "workers": 3,
                                            "listen": ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"],
                                            "advertise": "192.0.2.1:5080"}))
    assert config.worker_ports == (5061, 5062, 5063)
    assert config.worker_port_range(1) == (5064, 5065, 5066)  # the spare, for a hand-over
    # a Route naming any of them, the listen port or the advertised port is one to us
    assert config.our_ports == frozenset({5060, 5080, *range(5061, 5067)})


def test_default_worker_ports_skip_listen_ports(config_dir: Path) -> None:
    """udp/tcp on 5060 and tls on 5061 (the usual pair): the workers take 5062 on."""
    config = load_config(write(config_dir, {
        **MINIMAL, "workers": 2,
        "listen": ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060", "tcp:127.0.0.1:5061"]}))
    assert config.worker_ports == (5062, 5063)


def test_worker_port_base_sets_the_range_and_one_worker_has_none(config_dir: Path) -> None:
    base = {**MINIMAL, "transport": {"worker_port_base": 7000}}
    assert load_config(write(config_dir, {**base, "workers": 2})).worker_ports == (7000, 7001)
    assert load_config(write(config_dir, {**base, "workers": 1})).worker_ports == ()


RANGES = ("(worker_port_base + 0..2*workers-1: a range in use and a spare one for a hand-over, "
          "workers: 2")


@pytest.mark.parametrize(("changes", "what"), [
    # the default range (past listen[0]'s port) cannot pass 65535
    ({"listen": ["udp:127.0.0.1:65534"]},
     "the workers' own ports 65535..65538 " + RANGES + "; unset, so past listen[0]'s port) "
     "pass 65535"),
    ({"transport": {"worker_port_base": 5059}},
     "the workers' own ports 5059..5062 " + RANGES + ") "
     "overlap listen port 5060"),
    ({"transport": {"worker_port_base": 65533}},
     "the workers' own ports 65533..65536 " + RANGES + ") "
     "pass 65535"),
    ({"transport": {"worker_port_base": 9000}, "metrics": {"listen": "127.0.0.1:9001"}},
     "the workers' own ports 9000..9003 " + RANGES + ") "
     "overlap the metrics ports 9001..9002"),
])
def test_worker_port_range_clashes_are_refused(config_dir: Path, changes: dict, what: str
                                               ) -> None:
    shown, problems = problems_for(config_dir, workers=2, **changes)
    assert len(problems) == 1 and problems[0].startswith(
        f"{shown}: transport.worker_port_base: {what}"), problems


def test_worker_port_range_is_not_checked_with_one_worker(config_dir: Path) -> None:
    _, problems = problems_for(config_dir, workers=1, transport={"worker_port_base": 5060})
    assert problems == []


@pytest.mark.parametrize("value", [80, 70000, "5061"])
def test_worker_port_base_must_be_a_port(config_dir: Path, value: object) -> None:
    shown, problems = problems_for(config_dir, transport={"worker_port_base": value})
    assert len(problems) == 1 and problems[0].startswith(
        f"{shown}: transport.worker_port_base: "), problems


# --- TLS and the transport of large requests ---------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.tlsca import make_test_pki

    return make_test_pki(tmp_path_factory.mktemp("pki"))


def test_tls_listen_and_gateway_load_with_certificate_key_and_ca(config_dir: Path, pki: Any
                                                                 ) -> None:
    (config_dir / "tls").mkdir()
    for f in (pki.proxy.cert, pki.proxy.key, pki.ca):
        (config_dir / "tls" / f.name).write_bytes(f.read_bytes())
    config = load_config(write(config_dir, {
        **MINIMAL,
        "listen": ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060", "tls:127.0.0.1"],
        "carrier": {"gateways": ["sips:127.0.0.1:5091", "sip:127.0.0.1:5092;transport=tls"]},
        "transport": {"tls": {"certificate_file": "tls/proxy.crt",  # relative: config's dir
                              "private_key_file": "tls/proxy.key",
                              "ca_file": "tls/sip700-test-ca.crt",
                              "verify_clients": "required", "min_version": "1.3"}},
    }))
    tls = config.transport.tls
    assert tls.certificate_file == (config_dir / "tls/proxy.crt").resolve()
    assert tls.verify_servers is True and tls.handshake_timeout_s == 10
    assert [t.transport for t in config.carrier.targets] == ["tls", "tls"]
    assert config.advertised_ports == {"udp": 5060, "tcp": 5060, "tls": 5061}
    assert 5061 in config.our_ports
    from proxy.tls import client_context, server_context

    assert server_context(tls).verify_mode == ssl.CERT_REQUIRED
    assert client_context(tls).check_hostname is True


def test_tls_listen_needs_a_certificate(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, listen=["tls:127.0.0.1:5061"])
    assert problems == [f"{shown}: transport.tls.certificate_file: required with a tls: listen "
                        "entry (and private_key_file)"]


def test_tls_files_must_exist_pair_up_and_load(config_dir: Path, pki: Any) -> None:
    shown, problems = problems_for(config_dir, transport={"tls": {
        "certificate_file": "absent.crt", "private_key_file": str(pki.proxy.key)}})
    assert len(problems) == 1 and problems[0].startswith(
        f"{shown}: transport.tls.certificate_file: no such file ('absent.crt'"), problems
    shown, problems = problems_for(config_dir, transport={"tls": {
        "certificate_file": str(pki.proxy.cert)}})
    assert problems == [f"{shown}: transport.tls: certificate_file and private_key_file go "
                        "together: set both"]
    # a key that is not the certificate's
    shown, problems = problems_for(config_dir, transport={"tls": {
        "certificate_file": str(pki.proxy.cert), "private_key_file": str(pki.peer.key)}})
    assert len(problems) == 1 and "cannot load certificate_file" in problems[0], problems
    assert problems[0].startswith(f"{shown}: transport.tls: "), problems
    not_pem = config_dir / "junk.pem"
    not_pem.write_text("not a certificate")
    shown, problems = problems_for(config_dir, transport={"tls": {"ca_file": str(not_pem)}})
    assert len(problems) == 1 and "cannot load ca_file" in problems[0], problems


def test_tls_and_tcp_cannot_share_a_port(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, listen=["tcp:127.0.0.1:5060",
                                                       "tls:127.0.0.1:5060"])
    assert problems == [f"{shown}: listen: 'tcp:127.0.0.1:5060' and 'tls:127.0.0.1:5060' are "
                        "both TCP sockets on one port: give tls a port of its own (5061 by "
                        "default)"]


@pytest.mark.parametrize(("transport", "limit"), [
    ({}, 1300),  # path MTU unknown: RFC 3261 §18.1.1's 1300 bytes
    ({"path_mtu_bytes": 1500}, 1300),
    ({"path_mtu_bytes": 9000}, 8800),  # jumbo frames: within 200 bytes of the MTU
])
def test_large_request_limit_follows_the_path_mtu(config_dir: Path, transport: dict,
                                                  limit: int) -> None:
    config = load_config(write(config_dir, {**MINIMAL, "transport": transport}))
    assert config.transport.large_request_bytes == limit
    assert config.transport.large_requests_over_tcp is False


def test_path_mtu_must_be_a_real_mtu(config_dir: Path) -> None:
    shown, problems = problems_for(config_dir, transport={"path_mtu_bytes": 100})
    assert len(problems) == 1 and problems[0].startswith(
        f"{shown}: transport.path_mtu_bytes: "), problems


# --- worker CPU affinity -------------------------------------------------------------------


def test_worker_cpu_affinity_defaults_to_auto_and_takes_off_or_a_list(config_dir: Path) -> None:
    assert load_config(write(config_dir, MINIMAL)).worker_cpu_affinity == "auto"
    for off in (False, "off"):  # YAML 1.1 reads an unquoted off as false
        config = load_config(write(config_dir, {**MINIMAL, "worker_cpu_affinity": off}))
        assert config.worker_cpu_affinity == "off"
    path = config_dir / "off.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "worker_cpu_affinity: off\n")
    assert load_config(path).worker_cpu_affinity == "off"
    config = load_config(write(config_dir, {**MINIMAL, "worker_cpu_affinity": [3, 1]}))
    assert config.worker_cpu_affinity == (3, 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("on", "must be 'auto', false or a list of CPU numbers (got 'on')"),
        ([], "must be 'auto', false or a non-empty list of CPU numbers"),
        (True, "must be 'auto', false or a non-empty list of CPU numbers"),
        ([0, "1"], "CPU numbers are integers 0-4095 (got '1')"),
        ([0, True], "CPU numbers are integers 0-4095 (got True)"),
        ([-1], "CPU numbers are integers 0-4095 (got -1)"),
        ([1, 1], "a CPU is listed twice ([1, 1])"),
    ],
)
def test_worker_cpu_affinity_errors_name_the_key(
    config_dir: Path, value: Any, expected: str
) -> None:
    shown, problems = problems_for(config_dir, worker_cpu_affinity=value)
    assert problems == [f"{shown}: worker_cpu_affinity: {expected}"]


def test_auto_pins_one_worker_per_allowed_cpu_only() -> None:
    assert plan_worker_cpus("auto", 2, {4, 2}, None) == ((2, 4), "one worker per CPU")
    assert plan_worker_cpus("auto", 2, {0, 1}, 2) == ((0, 1), "one worker per CPU")
    # one worker, more or fewer workers than CPUs, a quota sharing the CPUs: not pinned
    assert plan_worker_cpus("auto", 1, {0}, None)[0] is None
    assert plan_worker_cpus("auto", 2, {0, 1, 2, 3}, None) == (
        None, "2 workers for 4 CPUs (auto pins one per CPU)")
    assert plan_worker_cpus("auto", 4, {0, 1}, None)[0] is None
    assert plan_worker_cpus("auto", 2, {0, 1}, 1) == (
        None, "a cgroup CPU quota of 1 CPUs shares the 2 CPUs")
    assert plan_worker_cpus("off", 2, {0, 1}, None) == (None, "worker_cpu_affinity: false")


def test_a_list_is_used_round_robin_and_must_name_allowed_cpus() -> None:
    assert plan_worker_cpus((1,), 3, {0, 1}, None) == ((1, 1, 1), "listed")
    assert plan_worker_cpus((1, 0), 3, {0, 1}, 1) == ((1, 0, 1), "listed")  # quota: as asked
    with pytest.raises(ValueError, match=r"^worker_cpu_affinity: CPU 5, 7 is not one this "
                                         r"process may use \(0, 1\)$"):
        plan_worker_cpus((0, 5, 7), 2, {0, 1}, None)


def test_worker_cpus_reads_this_process_mask(config_dir: Path) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    config = load_config(write(config_dir, {**MINIMAL, "workers": 3,
                                            "worker_cpu_affinity": [allowed[0]]}))
    assert config.worker_cpus() == ((allowed[0],) * 3, "listed")
    config = load_config(write(config_dir, {**MINIMAL, "worker_cpu_affinity": [max(allowed) + 1]}))
    with pytest.raises(ValueError, match="is not one this process may use"):
        config.worker_cpus()


# --- transport.low_load ---------------------------------------------------------------------


def test_low_load_defaults_and_the_hysteresis_named(config_dir: Path) -> None:
    low = load_config(write(config_dir, MINIMAL)).transport.low_load
    assert (low.enabled, low.enter_percent, low.leave_percent, low.hold_s) == (
        True, 65.0, 80.0, 10.0)
    shown, problems = problems_for(
        config_dir, transport={"low_load": {"enter_percent": 80, "leave_percent": 60}})
    assert len(problems) == 1 and problems[0].startswith(f"{shown}: transport.low_load: ")
    assert "enter_percent (80) must be under leave_percent (60)" in problems[0]
    shown, problems = problems_for(config_dir, transport={"low_load": {"hold_s": 0.5}})
    assert len(problems) == 1 and "transport.low_load.hold_s" in problems[0], problems
