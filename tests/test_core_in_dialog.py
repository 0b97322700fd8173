"""ProxyCore, sans-IO: what the proxy itself answers to in-dialog requests.

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
        advertise_host="127.0.0.1", advertise_port=5060, transport="udp",
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
