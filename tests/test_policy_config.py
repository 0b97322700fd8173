"""The `policy:` keys of the maximum call duration and flood protection, and what the core
gets from them (proxy/worker.py core_settings)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from proxy.config import load_config
from proxy.worker import core_settings
from tests.test_config import MINIMAL, config_dir, problems_for, write  # noqa: F401 (fixture)


def loaded(directory: Path, **changes: Any) -> Any:
    data = copy.deepcopy(MINIMAL)
    data.update(changes)
    return load_config(write(directory, data))


def test_max_call_s_from_policy_and_tenants_reaches_the_core(config_dir: Path) -> None:  # noqa: F811
    cfg = loaded(config_dir, policy={"max_call_s": 7200},
                 tenants=[{"id": "shop1", "max_call_s": 600}, {"id": "shop2"}])
    settings = core_settings(cfg)
    assert settings.max_call_s == 7200
    assert settings.tenant_max_call_s == {"shop1": 600}


def test_no_policy_means_no_limit(config_dir: Path) -> None:  # noqa: F811
    settings = core_settings(loaded(config_dir))
    assert settings.max_call_s is None and settings.tenant_max_call_s == {}


@pytest.mark.parametrize(("changes", "key"), [
    ({"policy": {"max_call_s": 0}}, "policy.max_call_s"),
    ({"policy": {"max_call_s": "1h"}}, "policy.max_call_s"),
    ({"policy": {"max_call_s": 86401}}, "policy.max_call_s"),
    ({"tenants": [{"id": "shop1", "max_call_s": -5}]}, "tenants[0].max_call_s"),
    ({"policy": {"max_call": 60}}, "policy.max_call"),
    ({"policy": {"flood": {"action": "block"}}}, "policy.flood.action"),
    ({"policy": {"flood": {"max_requests_per_s": 0}}}, "policy.flood.max_requests_per_s"),
    ({"policy": {"flood": {"cooldown_s": -1}}}, "policy.flood.cooldown_s"),
    ({"policy": {"flood": {"trusted_limit": 0}}}, "policy.flood.trusted_limit"),
    ({"policy": {"flood": {"enabled": "yes"}}}, "policy.flood.enabled"),
])
def test_bad_values_name_their_key(config_dir: Path, changes: dict, key: str) -> None:  # noqa: F811
    path, problems = problems_for(config_dir, **changes)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: {key}: "), problems


def test_flood_settings_reach_the_core_only_when_enabled(config_dir: Path) -> None:  # noqa: F811
    assert core_settings(loaded(config_dir)).flood is None
    off = loaded(config_dir, policy={"flood": {"enabled": False, "max_requests_per_s": 5}})
    assert core_settings(off).flood is None
    cfg = loaded(config_dir, policy={"flood": {"enabled": True, "max_requests_per_s": 300,
                                               "cooldown_s": 30, "action": "drop",
                                               "trusted_limit": 5000}})
    flood = core_settings(cfg).flood
    assert flood is not None
    assert (flood.max_requests_per_s, flood.cooldown_s, flood.action, flood.trusted_limit) == (
        300, 30.0, "drop", 5000)
