"""The policy engine, sans-IO: blocklists, time windows (clock passed in), counter plans and
verdicts, webhook replies; compiled from real YAML through the config loader."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from proxy.config import ConfigError, load_config_text
from proxy.policy.blocklist import BadEntry, Blocklist, parse_entry
from proxy.policy.engine import CallFacts, PolicyEngine
from proxy.policy.spec import compile_policy
from proxy.policy.windows import TimeWindow

X, A, B = "700100000000001", "13800000001", "13900000001"
SHANGHAI = ZoneInfo("Asia/Shanghai")


def config(policy: dict | None = None, tenant_policy: dict | None = None):
    data: dict = {"carrier": {"gateways": ["sip:127.0.0.1:5090"]},
                  "store": {"backend": "redis"}}
    if policy is not None:
        data["policy"] = policy
    if tenant_policy is not None:
        data["tenants"] = [{"id": "shop1", "policy": tenant_policy}]
    return load_config_text(yaml.safe_dump(data), Path("/tmp/policy-test.yaml"))


def engine(policy: dict | None = None, tenant_policy: dict | None = None) -> PolicyEngine:
    spec = compile_policy(config(policy, tenant_policy))
    assert spec is not None
    return PolicyEngine(spec, lambda n: n.startswith("700"))


def facts(tenant: str | None = "shop1", caller: str = A, callee: str = B, x: str = X
          ) -> CallFacts:
    return CallFacts("ck1", x, caller, callee, tenant, "bid", "out-1", "a_to_b")


def at(hour: int, minute: int = 0) -> float:
    return datetime(2026, 12, 2, hour, minute, tzinfo=SHANGHAI).timestamp()


def test_no_rule_means_no_policy_and_enabled_forces_it() -> None:
    assert compile_policy(config()) is None
    assert compile_policy(config({"refusal": {"code": 403, "reason": "No"}})) is None
    assert compile_policy(config({"enabled": True})) is not None
    assert compile_policy(config({"enabled": False, "rate_limits": [
        {"name": "r", "per": "caller", "max_calls": 1, "window_s": 60}]})) is None
    assert compile_policy(config(tenant_policy={"bulk": {"max_distinct_callees": 3,
                                                          "window_s": 60}})) is not None


def test_time_window_with_an_injected_clock() -> None:
    day = TimeWindow.parse("08:00", "22:00", "Asia/Shanghai")
    assert day.allows(at(8)) and day.allows(at(21, 59))
    assert not day.allows(at(22)) and not day.allows(at(7, 59))
    night = TimeWindow.parse("22:00", "06:00", "Asia/Shanghai")
    assert night.allows(at(23)) and night.allows(at(5)) and not night.allows(at(12))


def test_tenant_time_window_replaces_the_global_one() -> None:
    e = engine({"time_window": {"start": "08:00", "end": "22:00"}},
               {"time_window": {"start": "10:00", "end": "12:00", "code": 480,
                                "reason": "Closed"}})
    assert e.local(facts(tenant=None), at(9)) is None
    refused = e.local(facts(), at(9))
    assert refused is not None and (refused.rule, refused.code, refused.reason) == (
        "time_window", 480, "Closed")
    assert e.local(facts(), at(11)) is None
    outside = e.local(facts(tenant=None), at(23))
    assert outside is not None and (outside.code, outside.reason) == (403, "Call Policy")


def test_blocklist_matching_by_kind_and_prefix() -> None:
    bl = Blocklist.of([parse_entry("caller", "+8613800000009"), parse_entry("callee", B),
                       parse_entry("x", X), parse_entry("prefix", "170")])
    assert bl.match("13800000009", "13700000000", "700100000000002") == "caller"
    assert bl.match(A, B, "700100000000002") == "callee"
    assert bl.match(A, "13700000000", X) == "x"
    assert bl.match("17012345678", "13700000000", "700100000000002") == "prefix"
    assert bl.match(A, "13700000000", "700100000000002") is None
    with pytest.raises(BadEntry, match="kind"):
        parse_entry("nobody", A)
    with pytest.raises(BadEntry, match="prefix"):
        parse_entry("prefix", "17a")


def test_yaml_and_redis_blocklists_global_and_per_tenant() -> None:
    e = engine({"blocklist": {"callers": [A], "code": 603, "reason": "Blocked"}},
               {"blocklist": {"callees": ["13900000002"]}})
    refused = e.local(facts(), 0)
    assert refused is not None and (refused.rule, refused.code, refused.detail) == (
        "blocklist", 603, "caller")
    assert e.local(facts(caller="13800000002"), 0) is None
    assert e.local(facts(caller="13800000002", callee="13900000002"), 0) is not None
    # the tenant's list does not apply to another tenant's calls
    assert e.local(facts(tenant="shop2", caller="13800000002", callee="13900000002"), 0) is None
    e.redis_blocklists = {"": Blocklist.of(["x:700100000000009"]),
                          "shop2": Blocklist.of(["prefix:1380"])}
    assert e.local(facts(caller="13800000002", x="700100000000009"), 0) is not None
    assert e.local(facts(tenant="shop2", caller="13800000002"), 0) is not None
    assert e.local(facts(tenant="shop1", caller="13800000002"), 0) is None


def test_plan_names_one_counter_per_rule_and_subject() -> None:
    e = engine({"rate_limits": [{"name": "caller-min", "per": "caller", "max_calls": 5,
                                 "window_s": 60},
                                {"name": "t-day", "per": "tenant", "max_calls": 9,
                                 "window_s": 86400}],
                "concurrency": [{"name": "x-conc", "per": "x", "max_calls": 2}]},
               {"rate_limits": [{"name": "caller-min", "per": "callee", "max_calls": 1,
                                 "window_s": 10}],
                "bulk": {"max_distinct_callees": 3, "window_s": 600}})
    plan = e.plan(facts())
    assert plan is not None
    assert [c.key for c in plan.rates] == [
        f"sip700:policy:l::caller-min:{A}", "sip700:policy:l::t-day:shop1",
        f"sip700:policy:l:shop1:caller-min:{B}"]
    assert [(c.key, c.limit) for c in plan.concurrency] == [(f"sip700:policy:c::x-conc:{X}", 2)]
    assert plan.bulk is not None and plan.bulk.key == f"sip700:policy:b:shop1:{A}"
    no_tenant = e.plan(facts(tenant=None))
    assert no_tenant is not None and len(no_tenant.rates) == 1 and no_tenant.bulk is None


def test_counter_verdicts_name_the_rule_and_its_status() -> None:
    e = engine({"rate_limits": [{"name": "x-day", "per": "x", "max_calls": 2,
                                 "window_s": 86400, "code": 486, "reason": "Over Limit"}],
                "concurrency": [{"name": "x-conc", "per": "x", "max_calls": 1}],
                "bulk": {"max_distinct_callees": 3, "window_s": 60}})
    plan = e.plan(facts())
    assert plan is not None
    ok = e.counter_verdict(facts(), plan, [b"ok", 0])
    assert ok.connect and ok.slot == "ck1"  # holds concurrency: released at the call's end
    rate = e.counter_verdict(facts(), plan, [b"rate", 1])
    assert (rate.connect, rate.rule, rate.code, rate.reason) == (False, "x-day", 486,
                                                                  "Over Limit")
    conc = e.counter_verdict(facts(), plan, ["conc", 1])
    assert (conc.rule, conc.code, conc.reason) == ("x-conc", 403, "Call Policy")
    bulk = e.counter_verdict(facts(), plan, [b"bulk", 1])
    assert (bulk.rule, bulk.flag) == ("bulk", "bulk_caller")


def test_webhook_replies_and_fallbacks() -> None:
    hook_cfg = {"url": "https://tenant.example/decide", "fallback": "refuse", "code": 480,
                "reason": "No Decision"}
    e = engine(tenant_policy={"webhook": hook_cfg})
    f = facts()
    hook = e.webhook_for(f)
    assert hook is not None and hook.timeout_s == 0.3 and e.webhook_for(facts(None)) is None
    assert e.webhook_payload(f)["binding_id"] == "bid"
    assert e.webhook_verdict(f, hook, {"action": "connect"}).connect
    over = e.webhook_verdict(f, hook, {"action": "connect", "callee": "+8613700000001",
                                       "max_call_s": 30})
    assert (over.connect, over.callee, over.max_call_s) == (True, "13700000001", 30)
    refused = e.webhook_verdict(f, hook, {"action": "refuse", "code": 603,
                                          "reason": "Fraud Suspected"})
    assert (refused.connect, refused.rule, refused.code, refused.reason) == (
        False, "webhook", 603, "Fraud Suspected")
    # an unsafe reason phrase or status is replaced by the configured one
    sneaky = e.webhook_verdict(f, hook, {"action": "refuse", "code": 200,
                                         "reason": 'x"\r\nVia: evil'})
    assert (sneaky.code, sneaky.reason) == (480, "No Decision")
    # a bad reply, a callee in the middle-number range, a time-out: the fallback (refuse)
    for reply in ({"action": "maybe"}, {"action": "connect", "callee": X},
                  {"action": "connect", "callee": "not a number"},
                  {"action": "connect", "max_call_s": 0}, ["connect"]):
        d = e.webhook_verdict(f, hook, reply)
        assert (d.connect, d.code) == (False, 480), reply
    assert not e.webhook_verdict(f, hook, None, "timeout").connect
    lenient = engine(tenant_policy={"webhook": {"url": "http://127.0.0.1:1/x"}})
    lh = lenient.webhook_for(f)
    assert lh is not None and lenient.webhook_verdict(f, lh, None, "timeout").connect


@pytest.mark.parametrize(("policy", "problem"), [
    ({"rate_limits": [{"name": "a", "per": "ip", "max_calls": 1, "window_s": 1}]},
     "policy.rate_limits[0].per"),
    ({"rate_limits": [{"name": "a", "per": "x", "max_calls": 1, "window_s": 1},
                      {"name": "a", "per": "caller", "max_calls": 1, "window_s": 1}]},
     "duplicate rule name"),
    ({"concurrency": [{"name": "c", "per": "caller", "max_calls": 1}]},
     "policy.concurrency[0].per"),
    ({"blocklist": {"callers": ["abc"]}}, "policy.blocklist.callers[0]: not a phone number"),
    ({"time_window": {"start": "8", "end": "22:00"}}, "policy.time_window.start"),
    ({"time_window": {"start": "08:00", "end": "08:00"}}, "window would be empty"),
    ({"refusal": {"code": 200, "reason": "OK"}}, "policy.refusal.code"),
    ({"webhook": {"url": "https://x"}}, "policy.webhook: unknown key"),
])
def test_bad_policy_config_names_the_key(policy: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config(policy)
    assert any(problem in p for p in exc.value.problems), exc.value.problems


def test_max_call_s_and_flood_sit_with_the_rules() -> None:
    cfg = config({"max_call_s": 7200, "flood": {"enabled": True, "max_requests_per_s": 50}})
    assert cfg.policy.max_call_s == 7200
    assert cfg.policy.flood.enabled and cfg.policy.flood.max_requests_per_s == 50
    with pytest.raises(ConfigError) as exc:
        config({"flood": {"max_per_s": 50}})
    assert any("policy.flood.max_per_s" in p for p in exc.value.problems)


def test_webhook_url_must_be_http() -> None:
    with pytest.raises(ConfigError) as exc:
        config(tenant_policy={"webhook": {"url": "ftp://x"}})
    assert any("tenants[0].policy.webhook.url" in p for p in exc.value.problems)


def test_the_example_policy_config_loads() -> None:
    from proxy.config import check_config, load_config

    path = Path(__file__).parents[2] / "config" / "proxy-policy.yaml"
    assert check_config(path) == []
    spec = compile_policy(load_config(path))
    assert spec is not None and spec.has_concurrency and "shop1" in spec.webhooks
