"""Hot reload decisions, without processes: which keys need a restart, the config a worker
runs after a reload, gateways a reload removed, the bindings file check, ${VAR} in configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.config import ConfigError, expand_environment, load_config
from proxy.reload import (
    GatewayMemory,
    check_bindings_file,
    effective_config,
    restart_required,
    validate_file,
)

BINDINGS = ('bindings:\n'
            '  - {type: axb, x: "700100000000001", a: "13800000001", b: "13900000001", '
            'ttl: 600}\n')


def write(tmp_path: Path, name: str = "proxy.yaml", **config: object) -> Path:
    (tmp_path / "bindings.yaml").write_text(BINDINGS)
    base = {"listen": ["udp:127.0.0.1:5060"], "workers": 2,
            "carrier": {"gateways": ["sip:10.0.0.1:5060"]},
            "store": {"backend": "memory", "bindings_file": "bindings.yaml"}}
    base.update(config)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(base))
    return path


def test_restart_only_keys_are_named_and_keep_their_running_value(tmp_path: Path) -> None:
    running = load_config(write(tmp_path))
    new = load_config(write(tmp_path, "new.yaml", workers=4,
                            listen=["udp:127.0.0.1:5070"],
                            carrier={"gateways": ["sip:10.0.0.2:5060"]},
                            privacy={"dialog_key": "c2lwNzAwLXRlc3QtZGlhbG9nLWtleS0zMi1ieXRlcyE="},
                            timers={"timer_c_s": 90}))
    assert restart_required(running, new) == ["listen", "workers", "privacy.dialog_key"]
    live = effective_config(running, new, tmp_path)
    assert live.workers == 2 and live.listen == running.listen
    assert live.privacy.dialog_key is None
    assert [g.uri for g in live.carrier.gateways] == ["sip:10.0.0.2:5060"]  # a reload's job
    assert live.timers.timer_c_s == 90
    assert restart_required(running, running) == []


def test_a_removed_gateway_stays_known_for_its_calls(tmp_path: Path) -> None:
    old = load_config(write(tmp_path))
    new = load_config(write(tmp_path, "new.yaml", carrier={"gateways": ["sip:10.0.0.2:5060"]}))
    memory = GatewayMemory()
    memory.retire(old, new, now=1000.0)
    assert memory.hosts(now=1000.0 + old.privacy.max_dialog_s - 1) == {"10.0.0.1"}
    assert memory.hosts(now=1000.0 + old.privacy.max_dialog_s) == frozenset()
    memory.retire(old, new, now=0.0)
    memory.retire(new, old, now=1.0)  # back in the list: not "former" any more
    assert memory.hosts(now=2.0) == {"10.0.0.2"}


def test_bindings_file_that_loads_nothing_is_fatal_and_unreachable_x_warned(
        tmp_path: Path) -> None:
    path = write(tmp_path, middle_number_pattern=r"^700\d{11}$")
    check = check_bindings_file(load_config(path))
    assert check.ok and check.loaded == 1
    assert check.warnings and "700100000000001 never matches" in check.warnings[0]
    (tmp_path / "bindings.yaml").write_text("bindings:\n  - {type: axb, x: [\n")
    cfg, check, problems = validate_file(str(path))
    assert cfg is None and not check.ok
    assert any("loads no binding" in p for p in problems), problems


def test_environment_references(tmp_path: Path) -> None:
    text, problems = expand_environment(
        "a: ${A}\nb: [${B:-1.2.3.4/32}]\nc: ${C:-x}\nd: ${MISSING}\n", "f.yaml",
        {"A": "one", "C": ""})
    assert text == "a: one\nb: [1.2.3.4/32]\nc: x\nd: \n"
    assert problems == ["f.yaml: line 4: environment variable MISSING is not set (write "
                        "${MISSING:-default} to give a default)"]
    path = tmp_path / "env.yaml"
    path.write_text("carrier: {gateways: ['${SIP700_TEST_GW}']}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "SIP700_TEST_GW is not set" in str(err.value)
