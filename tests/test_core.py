"""ProxyCore, sans-IO: decisions the proxy takes itself, driven without sockets.

Regression test for the 100 Trying to an in-dialog INVITE: it was built from the request after
the rewrite for the other side, so the callee's re-INVITE got a 100 whose To showed the
caller's real number (found by scripts/sipp/uas_reinvite.xml).
"""

from __future__ import annotations

from proxy.bindings.model import Outcome, Resolution
from proxy.core import CoreSettings, Hop, ProxyCore
from proxy.privacy import DialogSealer
from proxy.sip.message import parse_message

X, A, B = "700100000000001", "13800000001", "13900000001"
CALLER = ("127.0.0.1", 5070)
GATEWAY = ("127.0.0.1", 5090)


def make_core() -> ProxyCore:
    settings = CoreSettings(
        advertise_host="127.0.0.1", advertise_port=5060,
        is_trusted=lambda ip: True, middle_number=lambda n: n.startswith("700"),
        gateways=[Hop(GATEWAY[0], GATEWAY[1], "udp")],
    )
    return ProxyCore(settings, DialogSealer(bytes(32)))


def request(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()


def established_route(core: ProxyCore) -> str:
    """Route A→X→B through the core; returns the Record-Route the callee saw."""
    core.receive_datagram(request([
        f"INVITE sip:{X}@127.0.0.1:5060 SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-a-1",
        f"From: <sip:{A}@127.0.0.1>;tag=atag",
        f"To: <sip:{X}@127.0.0.1>",
        "Call-ID: call-1",
        "CSeq: 1 INVITE",
        f"Contact: <sip:{A}@127.0.0.1:5070>",
        "Max-Forwards: 70",
    ]), CALLER, "udp", 0.0)
    relay, _x, _caller = core.lookups.pop()
    core.complete_lookup(relay, Resolution(Outcome.ROUTE, B, 1e12), 0.0)
    forwarded = [parse_message(o.data) for o in core.outbox if o.dest == GATEWAY]
    core.outbox.clear()
    assert len(forwarded) == 1
    return forwarded[0].header_values("record-route")[0]


def test_trying_to_a_callee_reinvite_shows_the_callee_its_own_headers() -> None:
    core = make_core()
    route = established_route(core)
    to_as_sent = f"To: <sip:{X}@127.0.0.1>;tag=atag"
    core.receive_datagram(request([
        f"INVITE sip:{X}@127.0.0.1:5070 SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK-b-1",
        f"Route: {route}",
        f"From: <sip:{X}@127.0.0.1>;tag=btag",
        to_as_sent,
        "Call-ID: call-1",
        "CSeq: 1 INVITE",
        f"Contact: <sip:{B}@127.0.0.1:5090>",
        "Max-Forwards: 70",
    ]), GATEWAY, "udp", 1.0)
    to_callee = [o.data for o in core.outbox if o.dest == GATEWAY]
    to_caller = [parse_message(o.data) for o in core.outbox if o.dest == CALLER]
    assert len(to_callee) == 1 and to_callee[0].startswith(b"SIP/2.0 100 ")
    assert A.encode() not in to_callee[0]
    assert to_as_sent.encode() in to_callee[0]
    # the re-INVITE itself does reach A with A's own number restored
    assert len(to_caller) == 1 and to_caller[0].to.uri.user == A


# ---- request validation and refusals (RFC 3261 §16.3) ---------------------------------------

def invite(x: str = X, caller: str = A, extra: tuple[str, ...] = (), branch: str = "b1",
           max_forwards: str = "70") -> bytes:
    return request([
        f"INVITE sip:{x}@127.0.0.1:5060 SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{branch}",
        f"From: <sip:{caller}@127.0.0.1>;tag=atag",
        f"To: <sip:{x}@127.0.0.1>",
        f"Call-ID: call-{branch}",
        "CSeq: 1 INVITE",
        f"Max-Forwards: {max_forwards}",
        *extra,
    ])


def answers(core: ProxyCore, dest: tuple[str, int] = CALLER) -> list[int]:
    out = [parse_message(o.data).status for o in core.outbox if o.dest == dest]
    return out


def test_refusals_are_answered_and_never_forwarded() -> None:
    cases = [
        (invite(max_forwards="0"), 483),
        (invite(extra=("Proxy-Require: com.example.magic",)), 420),
        (invite(x="13912345678"), 404),  # not a middle number
        (request([
            "INVITE nobodyknows:thisisnotauri SIP/2.0",
            "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-s1",
            "From: <sip:a@127.0.0.1>;tag=1", "To: <sip:b@127.0.0.1>", "Call-ID: s1",
            "CSeq: 1 INVITE", "Max-Forwards: 70"]), 416),
        (invite(extra=("Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKs7loop",),
                branch="l1"), 482),
    ]
    for data, status in cases:
        core = make_core()
        core.receive_datagram(data, CALLER, "udp", 0.0)
        assert answers(core) == [status], (data[:60], answers(core))
        assert not core.lookups
        assert answers(core, GATEWAY) == []
    core = make_core()
    core.receive_datagram(invite(extra=("Proxy-Require: com.example.magic",)), CALLER, "udp", 0.0)
    assert parse_message(core.outbox[0].data).header("unsupported") == "com.example.magic"


def test_untrusted_peer_gets_403_and_nothing_is_looked_up() -> None:
    core = make_core()
    core.settings.is_trusted = lambda ip: ip == "127.0.0.1"
    stranger = ("127.0.0.9", 5070)
    core.receive_datagram(invite(), stranger, "udp", 0.0)
    assert [parse_message(o.data).status for o in core.outbox] == [403]
    assert core.outbox[0].dest == stranger and not core.lookups
    assert core.stats["rejected_untrusted"] == 1


def test_tampered_token_is_refused() -> None:
    core = make_core()
    route = established_route(core)
    start = route.index("s7=") + 3
    bad = route[:start] + ("A" if route[start] != "A" else "B") + route[start + 1:]
    core.receive_datagram(request([
        "BYE sip:uas@127.0.0.1:5090 SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-bye",
        f"Route: {bad}",
        f"From: <sip:{A}@127.0.0.1>;tag=atag",
        f"To: <sip:{X}@127.0.0.1>;tag=btag",
        "Call-ID: call-1", "CSeq: 2 BYE", "Max-Forwards: 70",
    ]), CALLER, "udp", 1.0)
    assert answers(core) == [403] and answers(core, GATEWAY) == []


def _callee_reply(forwarded_invite: bytes, status: int, *, vias: int = 2) -> bytes:
    """A reply from the gateway to the INVITE the core forwarded."""
    forwarded = parse_message(forwarded_invite)
    rows = [row.decode() for name, row in forwarded.rows
            if name in ("via", "from", "to", "call-id", "cseq")]
    via_rows = [r for r in rows if r.lower().startswith("via")][:vias]
    other = [r for r in rows if not r.lower().startswith("via")]
    other = [r + ";tag=btag" if r.lower().startswith("to") else r for r in other]
    return request([f"SIP/2.0 {status} Whatever", *via_rows, *other])


def route_call(core: ProxyCore) -> bytes:
    """A→X through the core; returns the INVITE it sent to the gateway."""
    core.receive_datagram(invite(), CALLER, "udp", 0.0)
    relay, _x, _caller = core.lookups.pop()
    core.complete_lookup(relay, Resolution(Outcome.ROUTE, B, 1e12), 0.0)
    sent = [o.data for o in core.outbox if o.dest == GATEWAY]
    core.outbox.clear()
    assert len(sent) == 1
    return sent[0]


def test_response_carrying_only_our_via_is_not_forwarded() -> None:
    core = make_core()
    forwarded = route_call(core)
    core.receive_datagram(_callee_reply(forwarded, 180, vias=1), GATEWAY, "udp", 0.1)
    assert answers(core) == []
    assert core.stats["responses_dropped"] == 1


def test_2xx_after_timer_c_is_still_forwarded() -> None:
    core = make_core()
    core.settings.timer_c = 1.0
    forwarded = route_call(core)
    core.receive_datagram(_callee_reply(forwarded, 180), GATEWAY, "udp", 0.1)
    core.outbox.clear()
    core.handle_timers(1.5)  # Timer C: CANCEL down, 408 up
    assert answers(core) == [408]
    cancels = [o.data for o in core.outbox if o.dest == GATEWAY]
    assert cancels and cancels[0].startswith(b"CANCEL ")
    core.outbox.clear()
    core.receive_datagram(_callee_reply(forwarded, 200), GATEWAY, "udp", 1.6)
    ok = [parse_message(o.data) for o in core.outbox if o.dest == CALLER]
    assert [m.status for m in ok] == [200]
    assert ok[0].from_.uri.user == A and B.encode() not in ok[0].serialize()
    assert core.stats["late_2xx_forwarded"] == 1
