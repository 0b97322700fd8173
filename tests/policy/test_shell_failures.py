"""The policy's shell when what it depends on fails, on real loopback sockets: a webhook
endpoint that is down trips its circuit breaker (no call waits for it meanwhile); the policy's
Redis unreachable gives the configured on_error."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from types import SimpleNamespace

import yaml

from proxy.config import load_config_text
from proxy.policy.engine import CallFacts
from proxy.policy.runner import PolicyRunner
from proxy.policy.spec import compile_policy
from proxy.policy.webhook import WebhookClient


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec(policy: dict, shop1: dict | None = None):
    data = {"carrier": {"gateways": ["sip:127.0.0.1:5090"]}, "store": {"backend": "redis"},
            "policy": policy, "tenants": [{"id": "shop1", **({"policy": shop1} if shop1
                                                             else {})}]}
    compiled = compile_policy(load_config_text(yaml.safe_dump(data), Path("/tmp/p.yaml")))
    assert compiled is not None
    return compiled


async def test_a_down_endpoint_opens_the_circuit() -> None:
    s = spec({}, {"webhook": {"url": f"http://127.0.0.1:{closed_port()}/x",
                              "circuit_breaker": {"failure_threshold": 2, "open_s": 30.0}}})
    hook = s.webhooks["shop1"]
    client = WebhookClient()
    try:
        failures = [(await client.ask(hook, {}))[1] for _ in range(3)]
    finally:
        await client.close()
    assert failures[0].startswith("unreachable") and failures[1].startswith("unreachable")
    assert failures[2] == "circuit open"


async def test_redis_unreachable_gives_on_error() -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    facts = CallFacts("k1", "700100000000001", "13800000001", "13900000001", "shop1")
    core = SimpleNamespace(settings=SimpleNamespace(middle_number=lambda n: n[:3] == "700"),
                           stats={}, policy_out=[])
    for on_error, connect in (("connect", True), ("refuse", False)):
        s = spec({"redis_url": url, "on_error": on_error, "rate_limits": [
            {"name": "r", "per": "caller", "max_calls": 1, "window_s": 60}]})
        runner = PolicyRunner(core, s, lambda: None)
        plan = runner.engine.plan(facts)
        assert plan is not None
        started = time.monotonic()
        decision = await runner._counters(facts, plan)
        assert time.monotonic() - started < 2
        assert decision.connect is connect
        if not connect:
            assert (decision.rule, decision.code) == ("unavailable", 503)
        await runner.close()
    assert core.stats["policy_unavailable"] == 2
