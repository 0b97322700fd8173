"""The API's config keys: tenants, keys, pools, and what check-config refuses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.api.keys import KeyRing, hash_key, key_id, new_key
from proxy.api.pools import Pools
from proxy.api.ratelimit import RateLimiter
from proxy.config import check_config, load_config

ROOT = Path(__file__).resolve().parents[2]
H1, H2 = hash_key("k1"), hash_key("k2")


def write(tmp_path: Path, tenants: list[dict], **extra: object) -> Path:
    (tmp_path / "b.yaml").write_text("bindings: []\n")
    data = {"carrier": {"gateways": ["sip:127.0.0.1:5090"]},
            "store": {"backend": "memory", "bindings_file": "b.yaml"},
            "api": {"listen": "127.0.0.1:8700"}, "tenants": tenants, **extra}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tenant(tid: str, key: str, *pools: dict) -> dict:
    return {"id": tid, "api_keys": [key], "pools": list(pools)}


def test_the_issue_example_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, [{
        "id": "shop1", "api_keys": [H1], "max_pairs_per_x": 200, "rate_limit_per_s": 1000,
        "pools": [{"range": "700100000000001-700100000000020", "area": "010"},
                  {"numbers": ["700100000000031"]}]}], operator_keys=[H2]))
    assert cfg.api.require_order_id is True and cfg.api.max_ttl_s == 2592000
    pools = Pools(cfg)
    assert pools.owner("700100000000020") == ("shop1", "010")
    assert pools.owner("700100000000031") == ("shop1", "-")
    assert pools.owner("700100000000021") is None
    assert pools.search_order("shop1", "010", strict=True) == ["010"]
    assert pools.search_order("shop1", "010", strict=False) == ["010", "-"]
    assert pools.search_order("shop1", "0755", strict=True) == []
    assert len(list(pools.numbers("shop1", "010"))) == 20


@pytest.mark.parametrize(("tenants", "where", "words"), [
    ([tenant("a", H1, {"range": "700100000000001-700100000000020"}),
      tenant("b", H2, {"range": "700100000000015-700100000000030"})],
     "tenants[1].pools[0].range", "overlaps tenants[0].pools[0].range (tenant 'a')"),
    ([tenant("a", H1, {"range": "700100000000001-700100000000020"},
             {"numbers": ["700100000000007"]})],
     "tenants[0].pools[1].numbers[0]", "the same tenant"),
    ([tenant("a", H1, {"numbers": ["700100000000001"]}),
      tenant("b", H2, {"numbers": ["700100000000001"]})],
     "tenants[1].pools[0].numbers[0]", "exactly one tenant"),
    ([tenant("a", H1, {"range": "600100000000001-600100000000002"})],
     "tenants[0].pools[0].range", "middle_number_pattern"),
    ([tenant("a", H1), tenant("a", H2)], "tenants[1].id", "duplicate tenant id"),
    ([tenant("a", H1), tenant("b", H1)], "tenants[1].api_keys[0]", "one tenant"),
    ([tenant("a", "k1")], "tenants[0].api_keys[0]", "sha256"),
    ([tenant("a", H1, {"range": "700100000000020-700100000000001"})],
     "tenants[0].pools[0].range", "after LAST"),
    ([tenant("a", H1, {"range": "700100000000001-700100000000002", "numbers": ["1"]})],
     "tenants[0].pools[0]", "either range or numbers"),
    ([tenant("a", H1, {"numbers": ["700100000000001"], "area": "10"})],
     "tenants[0].pools[0].area", "area code"),
])
def test_check_config_names_the_key(tmp_path: Path, tenants: list[dict], where: str,
                                    words: str) -> None:
    problems = check_config(write(tmp_path, tenants))
    assert any(f": {where}: " in p and words in p for p in problems), problems


def test_check_config_command_refuses_a_pool_overlap(tmp_path: Path) -> None:
    path = write(tmp_path, [tenant("a", H1, {"range": "700100000000001-700100000000020"}),
                            tenant("b", H2, {"numbers": ["700100000000009"]})])
    done = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1
    assert "tenants[1].pools[0].numbers[0]: overlaps tenants[0].pools[0].range" in done.stdout


def test_api_key_new_prints_a_key_and_its_hash_once() -> None:
    done = subprocess.run([sys.executable, "-m", "proxy", "api-key", "new", "--tenant", "shop1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0
    key = done.stdout.split("key:")[1].split()[0]
    assert f"hash: {hash_key(key)}" in done.stdout and key not in done.stderr


def test_keyring_and_key_ids(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, [tenant("a", hash_key("ka"))],
                            operator_keys=[hash_key("op")]))
    ring = KeyRing(cfg)
    assert ring.from_authorization("Bearer ka").tenant == "a"
    assert ring.from_authorization("bearer op").is_operator
    assert ring.from_authorization("Basic ka") is None
    assert ring.from_authorization("Bearer kb") is None
    assert ring.principal("ka").key_id == key_id(hash_key("ka")) and len(key_id(H1)) == 12
    assert new_key() != new_key() and len(new_key()) > 40


def test_rate_limiter_refills() -> None:
    now = [0.0]
    limiter = RateLimiter({"t": 2.0}, clock=lambda: now[0])
    assert [limiter.check("t") for _ in range(2)] == [0.0, 0.0]
    wait = limiter.check("t")
    assert wait == pytest.approx(0.5) and RateLimiter.retry_after(wait) == "1"
    now[0] = 0.5
    assert limiter.check("t") == 0.0
    assert limiter.check("unknown") == 0.0
