"""The 100 Trying to an INVITE (RFC 3261 §17.2.1), on a real proxy process over UDP.

`timers.trying_after_ms` (default 200): the 100 is held that long and sent only when nothing
else went to the caller meanwhile. A and B are plain UDP sockets (tests/integration/rawsip.py),
B bound on the carrier gateway's port, so the test decides when (and whether) B answers.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.integration.procs import ProxyProcess, free_port, start_proxy, write_config
from tests.integration.rawsip import (
    Peer,
    answer_call,
    describe,
    is_request,
    is_response,
    start_call,
)


def _proxy(tmp_path: Path, proxies: list[ProxyProcess], b: Peer, trying_after_ms: int | None
           ) -> ProxyProcess:
    port = free_port()
    overrides: dict = {"workers": 1}
    if trying_after_ms is not None:
        overrides["timers"] = {"trying_after_ms": trying_after_ms}
    cfg_dir = tmp_path / f"proxy-{port}"
    cfg_dir.mkdir()
    path, config = write_config(cfg_dir, port=port, gateway_port=b.port, overrides=overrides,
                                transports=("udp",))
    proxy = start_proxy(path, port, b.port, cfg_dir / "proxy.log", config)
    proxies.append(proxy)
    return proxy


def test_the_100_trying_is_held_and_sent_only_to_a_caller_still_waiting(
    tmp_path: Path, proxies: list[ProxyProcess]
) -> None:
    """Default config. A call B answers at once: A gets 180 and 200, never a 100. A call B
    leaves ringing silently: A gets one 100, 200 ms or more after its INVITE, then B's 180."""
    a, b = Peer(name="A"), Peer(name="B")
    try:
        proxy = _proxy(tmp_path, proxies, b, None)
        answered = answer_call(start_call(proxy.port, a, b)[0], ack=False)
        answered.ack_from_a()
        answered.bye_from_a()
        got = [m.msg.status for m in answered.a_received() if not m.msg.is_request]
        late = a.quiet(0.4)
        assert 100 not in got and not late, f"A got {got} then {describe(late)}"

        dialog, _ = start_call(proxy.port, a, b)
        sent_at = time.monotonic()
        invite = b.wait(is_request("INVITE"))
        assert invite is not None, describe(a.pending)
        trying = a.wait(is_response(100), timeout=3.0)
        waited = time.monotonic() - sent_at
        assert trying is not None, f"no 100 while B was silent; A got {describe(a.pending)}"
        assert waited >= 0.19, f"the 100 came {waited * 1000:.0f} ms after the INVITE"
        assert trying.msg.call_id == dialog.a_call_id and trying.msg.to.tag is None
        assert not a.quiet(0.5), "more than one 100"  # one, not one per tick
        b.answer(invite, 180, "Ringing", to_tag="bt", record_route=True,
                 headers=[("Contact", f"<sip:127.0.0.1:{b.port}>")])
        assert a.wait(is_response(180)) is not None, describe(a.pending)
        b.answer(invite, 486, "Busy Here", to_tag="bt")
        assert a.wait(is_response(486)) is not None, describe(a.pending)
    finally:
        a.close()
        b.close()
    stats = proxy.stop_and_read_stats()
    assert stats.get("calls_routed") == 2, stats


def test_trying_after_zero_answers_every_invite_with_a_100_at_once(
    tmp_path: Path, proxies: list[ProxyProcess]
) -> None:
    a, b = Peer(name="A"), Peer(name="B")
    try:
        proxy = _proxy(tmp_path, proxies, b, 0)
        dialog, _ = start_call(proxy.port, a, b)
        sent_at = time.monotonic()
        trying = a.wait(is_response(100), timeout=3.0)
        assert trying is not None, describe(a.pending)
        assert time.monotonic() - sent_at < 0.19  # not held
        answer_call(dialog)
        dialog.bye_from_a()
        assert a.log[-1].msg.status == 200, describe(dialog.a_received())
    finally:
        a.close()
        b.close()
