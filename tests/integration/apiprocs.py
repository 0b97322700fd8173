"""Real binding-API processes for tests: configs with tenants and keys, `sip700 api` started
and waited for, an HTTP client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from proxy.api.keys import hash_key
from tests.integration.procs import REDIS_URL, ROOT, TEST_DIALOG_KEY, free_port, stop_process

KEYS = {"shop1": "s7k_test-key-shop1", "shop2": "s7k_test-key-shop2",
        "slow": "s7k_test-key-slow"}
OPERATOR_KEY = "s7k_test-operator-key"


def tenants(pool_size: int = 20, cap: int = 40) -> list[dict]:
    """shop1: two areas (010: pool_size numbers, 021: 5); shop2: its own 10; slow: 5/s."""
    last = 700100000000000 + pool_size
    return [
        {"id": "shop1", "api_keys": [hash_key(KEYS["shop1"])], "max_pairs_per_x": cap,
         "rate_limit_per_s": 100000,
         "pools": [{"range": f"700100000000001-{last}", "area": "010"},
                   {"range": "700100000900001-700100000900005", "area": "021"}]},
        {"id": "shop2", "api_keys": [hash_key(KEYS["shop2"])], "rate_limit_per_s": 100000,
         "pools": [{"range": "700200000000001-700200000000010"}]},
        {"id": "slow", "api_keys": [hash_key(KEYS["slow"])], "rate_limit_per_s": 5,
         "pools": [{"numbers": ["700300000000001"]}]},
    ]


def free_tcp_port() -> int:
    """A port for an API server: drawn and claimed as the proxy's are (procs.free_port), not
    bound to 0, whose port the kernel may hand to a client socket before the server binds it."""
    return free_port()


def api_config(tmp: Path, prefix: str, *, port: int, tenant_list: list[dict] | None = None,
               extra: dict | None = None) -> Path:
    config = {
        "carrier": {"gateways": ["sip:127.0.0.1:5090"]},
        "store": {"backend": "redis", "redis_url": REDIS_URL, "key_prefix": prefix},
        "privacy": {"dialog_key": TEST_DIALOG_KEY},
        "api": {"listen": f"127.0.0.1:{port}", "require_order_id": True},
        "operator_keys": [hash_key(OPERATOR_KEY)],
        "tenants": tenant_list if tenant_list is not None else tenants(),
        "logging": {"level": "info"},
    }
    config.update(extra or {})
    path = tmp / f"api-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@dataclass
class ApiProcess:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        return stop_process(self.proc)


def start_api(config_path: Path, port: int, log_path: Path) -> ApiProcess:
    """`python -m proxy api --config …`, waited for until /healthz answers."""
    log = log_path.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "api", "--config", str(config_path)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"API did not start:\n{log_path.read_text()}") from None
    return ApiProcess(port, proc, log_path)


def bearer(tenant: str) -> dict[str, str]:
    key = OPERATOR_KEY if tenant == "operator" else KEYS[tenant]
    return {"Authorization": f"Bearer {key}"}


def call_api(base_url: str, key: str, method: str, path: str, data: dict | None = None
             ) -> tuple[int, dict]:
    """One JSON request to the binding API with `key`: (status, the JSON answer or {})."""
    request = urllib.request.Request(
        base_url + path, method=method,
        data=None if data is None else json.dumps(data).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
            return response.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
