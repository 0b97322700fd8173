"""The transport of each leg, sans-IO: proxy/legs.py and what ProxyCore does with it.

No sockets: a ProxyCore is fed messages as if from a caller A and a gateway B on given
transports, and what it hands the shell (Outgoing: bytes, destination, transport, flow) is
checked — the Record-Route of each leg (RFC 5658 double Record-Route when they differ, each
side seeing only its own token), the two Route entries popped as one hop, requests towards a
caller down the connection it opened (its flow), and large requests over TCP (RFC 3261
§18.1.1).
"""

from __future__ import annotations

import re

import pytest

from proxy.bindings.model import Outcome, Resolution
from proxy.core import CoreSettings, Hop, Outgoing, ProxyCore
from proxy.legs import (
    Flow,
    decode_peer,
    encode_peer,
    record_route_prefix,
    response_fallback,
    too_large_for_udp,
    uri_transport,
)
from proxy.privacy import CALLER, DialogRule, DialogSealer
from proxy.sip.message import build_response, parse_message
from proxy.sip.uri import parse_uri

X, A, B = "700100000000001", "13800000001", "13900000001"
A_ADDR = ("127.0.0.1", 40123)  # A's source: an ephemeral port when A came over TCP
A_CONTACT_PORT = 5070
GW = ("127.0.0.2", 5090)
KEY = bytes(32)


# ---- legs.py ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("uri", "transport"), [
    ("sip:a@h", None), ("sip:a@h;transport=TCP", "tcp"), ("sip:h;transport=tls", "tls"),
    ("sips:a@h", "tls"), ("sips:a@h;transport=tcp", "tls"), ("sip:h;transport=sctp", None),
    ("sip:h;transport=udp", "udp"),
])
def test_uri_transport(uri: str, transport: str | None) -> None:
    assert uri_transport(parse_uri(uri)) == transport


def test_record_route_prefix_per_leg() -> None:
    assert record_route_prefix("10.0.0.1:5060", "udp") == "<sip:10.0.0.1:5060;lr;s7="
    assert record_route_prefix("10.0.0.1:5060", "tcp") == \
        "<sip:10.0.0.1:5060;transport=tcp;lr;s7="
    assert record_route_prefix("10.0.0.1:5061", "tls") == \
        "<sip:10.0.0.1:5061;transport=tls;lr;s7="
    assert record_route_prefix("10.0.0.1:5061", "tls", sips=True) == "<sips:10.0.0.1:5061;lr;s7="


def test_peer_encoding_round_trips_and_stays_empty_for_udp() -> None:
    assert encode_peer("udp") == "" and decode_peer("") == (None, None)
    assert decode_peer(encode_peer("tcp")) == ("tcp", None)
    flow = Flow(3, "192.0.2.7", 40123)
    assert decode_peer(encode_peer("tls", flow)) == ("tls", flow)
    assert decode_peer(encode_peer("tcp", Flow(None, "::1", 5)))[1] == Flow(None, "::1", 5)
    assert decode_peer("tcp x 1.2.3.4 5") == ("tcp", None)  # never trusted blindly
    assert decode_peer("sctp") == (None, None)


def test_a_token_with_a_peer_seals_it_and_an_old_token_still_opens() -> None:
    sealer = DialogSealer(KEY)
    rule = DialogRule(X, A, B, A, CALLER, "d1", 123, encode_peer("tcp", Flow(1, "10.0.0.9", 7)))
    token = sealer.seal(rule)
    assert "10.0.0.9" not in token and sealer.open(token) == rule
    old = DialogRule(X, A, B, A, CALLER, "d1", 123)  # sealed before tokens had a peer
    assert sealer.open(sealer.seal(old)).peer == ""
    # a UDP token carries no peer: no longer than one without
    assert len(sealer.seal(old)) == len(sealer.seal(DialogRule(X, A, B, A, CALLER, "d1", 9)))
    assert len(token) > len(sealer.seal(old))


def test_too_large_for_udp_follows_rfc3261_18_1_1() -> None:
    assert not too_large_for_udp(1300) and too_large_for_udp(1301)
    assert too_large_for_udp(1301, 8800) is False and too_large_for_udp(8801, 8800)


def test_response_fallback_is_the_sent_by_port_at_the_source_ip() -> None:
    resp = (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 10.9.9.9:5070;branch=z9hG4bK1;"
            b"received=10.6.6.6;rport=40123\r\nVia: SIP/2.0/UDP 1.1.1.1\r\n"
            b"Call-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")
    # RFC 3261 §18.2.2: the sent-by port, at the address the request came from (not the
    # `received` the sender may have written itself, not rport's ephemeral port)
    assert response_fallback(resp, "127.0.0.1") == ("127.0.0.1", 5070)
    tls = resp.replace(b"TCP 10.9.9.9:5070", b"TLS a.example")
    assert response_fallback(tls, "127.0.0.1") == ("127.0.0.1", 5061)
    assert response_fallback(b"garbage", "127.0.0.1") is None
    assert response_fallback(resp, "not-an-ip") is None


# ---- the core ---------------------------------------------------------------------------------

TCP_GW = Hop(*GW, "tcp")


def make_core(gateway: Hop = TCP_GW, **overrides: object) -> ProxyCore:
    settings = CoreSettings(
        advertise_host="127.0.0.1", advertise_port=5060,
        transport_ports={"tcp": 5060, "tls": 5061},
        is_trusted=lambda ip: ip.startswith("127."),
        middle_number=lambda n: n.startswith("700"), gateways=[gateway],
        is_gateway_address=lambda ip: ip == GW[0], wall_clock=lambda: 1_800_000_000.0)
    for name, value in overrides.items():
        setattr(settings, name, value)
    return ProxyCore(settings, DialogSealer(KEY))


def rows(lines: list[str], body: str = "", content_type: str = "application/sdp") -> bytes:
    if body:
        lines = [*lines, f"Content-Type: {content_type}"]
    return ("\r\n".join(lines) + f"\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()


class Call:
    """A → X → B through one core: A on `a_transport`, the gateway on the core's."""

    def __init__(self, core: ProxyCore, a_transport: str, *, contact_host: str = "127.0.0.1",
                 body: str = "") -> None:
        self.core = core
        self.a_transport = a_transport
        self.a_source = A_ADDR if a_transport != "udp" else ("127.0.0.1", A_CONTACT_PORT)
        core.receive_datagram(rows([
            f"INVITE sip:{X}@127.0.0.1:5060 SIP/2.0",
            f"Via: SIP/2.0/{a_transport.upper()} 127.0.0.1:{A_CONTACT_PORT};branch=z9hG4bKa1;"
            "rport",
            f"From: <sip:{A}@127.0.0.1>;tag=atag", f"To: <sip:{X}@127.0.0.1>",
            "Call-ID: call-1", "CSeq: 1 INVITE",
            f"Contact: <sip:{A}@{contact_host}:{A_CONTACT_PORT}>", "Max-Forwards: 70",
        ], body), self.a_source, a_transport, 0.0)
        relay, _x, _caller = core.lookups.pop()
        core.complete_lookup(relay, Resolution(Outcome.ROUTE, B, 1e12), 0.0)
        (self.invite_out,) = self.take(GW)
        self.invite = parse_message(self.invite_out.data)
        self.b_routes = self.invite.header_values("record-route")  # B's route set, in order
        ok = build_response(self.invite, 200, "OK", to_tag="btag", headers=[
            *(("Record-Route", r) for r in self.b_routes),
            ("Contact", f"<sip:{B}@{GW[0]}:{GW[1]}>")])
        core.receive_datagram(ok.serialize(), GW, self.invite_out.transport, 0.1)
        (self.ok_out,) = self.take(self.a_source)
        self.ok = parse_message(self.ok_out.data)
        self.a_routes = list(reversed(self.ok.header_values("record-route")))  # A's route set

    def take(self, dest: tuple[str, int]) -> list[Outgoing]:
        out = [o for o in self.core.outbox if o.dest == dest]
        self.core.outbox.clear()
        return out

    def from_a(self, method: str, *, cseq: int = 2, body: str = "") -> None:
        self.core.receive_datagram(rows([
            f"{method} sip:{B}@{GW[0]}:{GW[1]} SIP/2.0",
            f"Via: SIP/2.0/{self.a_transport.upper()} 127.0.0.1:{A_CONTACT_PORT};"
            f"branch=z9hG4bKa{cseq}{method}",
            *(f"Route: {r}" for r in self.a_routes),
            f"From: <sip:{A}@127.0.0.1>;tag=atag", f"To: <sip:{X}@127.0.0.1>;tag=btag",
            "Call-ID: call-1", f"CSeq: {cseq} {method}", "Max-Forwards: 70",
        ], body, "text/plain"), self.a_source, self.a_transport, 1.0)

    def from_b(self, method: str, *, cseq: int = 7) -> None:
        target = parse_message(self.invite_out.data).header_values("contact")[0].strip("<>")
        self.core.receive_datagram(rows([
            f"{method} {target} SIP/2.0",
            f"Via: SIP/2.0/{self.invite_out.transport.upper()} {GW[0]}:{GW[1]};"
            f"branch=z9hG4bKb{cseq}",
            *(f"Route: {r}" for r in self.b_routes),
            f"From: <sip:{X}@127.0.0.1>;tag=btag", f"To: <sip:{X}@127.0.0.1>;tag=atag",
            f"Call-ID: {self.invite.call_id}", f"CSeq: {cseq} {method}", "Max-Forwards: 70",
        ]), GW, self.invite_out.transport, 1.0)


def tokens(routes: list[str]) -> set[str]:
    return {m.group(1) for r in routes for m in [re.search(r";s7=([^;>]+)", r)] if m}


def test_udp_caller_tcp_gateway_double_record_route_each_side_its_own_token() -> None:
    """RFC 5658: the INVITE to B carries two entries, the TCP one (B's leg) on top and the UDP
    one (A's leg) below, both with B's token; A's 200 has the same two with A's token."""
    call = Call(make_core(), "udp")
    assert call.invite_out.transport == "tcp"
    assert [r.split(";s7=")[0] for r in call.b_routes] == [
        "<sip:127.0.0.1:5060;transport=tcp;lr", "<sip:127.0.0.1:5060;lr"]
    assert call.invite.top_via.transport == "TCP"
    assert call.invite.uri_text == f"sip:{B}@{GW[0]}:{GW[1]};transport=tcp"
    b_tokens, a_tokens = tokens(call.b_routes), tokens(call.a_routes)
    assert len(b_tokens) == 1 and len(a_tokens) == 1 and b_tokens != a_tokens
    assert next(iter(b_tokens)).encode() not in call.ok_out.data  # A never sees B's token
    assert call.ok_out.transport == "udp"
    # A's BYE brings both entries: one hop, both popped, to B over TCP (its leg)
    call.from_a("BYE")
    (bye,) = call.take(GW)
    assert bye.transport == "tcp" and parse_message(bye.data).header_values("route") == []
    assert parse_message(bye.data).top_via.transport == "TCP"
    # B's BYE: both popped, to A's Contact over UDP
    call.from_b("BYE")
    (bye,) = call.take(("127.0.0.1", A_CONTACT_PORT))
    assert bye.transport == "udp" and bye.flow is None
    assert parse_message(bye.data).header_values("route") == []


def test_same_transport_on_both_legs_one_record_route_with_that_transport() -> None:
    call = Call(make_core(), "tcp")
    assert len(call.b_routes) == 1
    assert call.b_routes[0].startswith("<sip:127.0.0.1:5060;transport=tcp;lr;s7=")
    assert call.ok_out.transport == "tcp" and call.ok_out.dest == A_ADDR  # on A's connection


def test_udp_both_legs_record_route_is_as_before() -> None:
    call = Call(make_core(Hop(*GW, "udp")), "udp")
    assert [r.split(";s7=")[0] for r in call.b_routes] == ["<sip:127.0.0.1:5060;lr"]


def test_tls_caller_udp_gateway_record_routes_tls_with_its_port() -> None:
    call = Call(make_core(Hop(*GW, "udp")), "tls")
    assert [r.split(";s7=")[0] for r in call.b_routes] == [
        "<sip:127.0.0.1:5060;lr", "<sip:127.0.0.1:5061;transport=tls;lr"]


def test_requests_to_a_tcp_caller_go_down_its_connection() -> None:
    """A called over TCP from an ephemeral port with a Contact that names neither TCP nor that
    port: B's requests go over TCP, down the connection A opened (its flow), else to A's
    Contact port over TCP."""
    call = Call(make_core(Hop(*GW, "udp"), worker_index=1), "tcp")
    call.from_b("BYE")
    (bye,) = call.take(("127.0.0.1", A_CONTACT_PORT))
    assert bye.transport == "tcp" and bye.flow == Flow(1, *A_ADDR)
    assert parse_message(bye.data).top_via.transport == "TCP"


def test_a_caller_behind_nat_is_reached_only_down_its_connection() -> None:
    """A's Contact is a private address nobody allowed as a next hop: its requests go to the
    connection A opened (from an address we trust), never to the Contact."""
    call = Call(make_core(Hop(*GW, "udp")), "tcp", contact_host="10.1.2.3")
    call.from_b("INVITE")
    out = [o for o in call.core.outbox if o.data.startswith(b"INVITE")]
    assert len(out) == 1 and out[0].dest == A_ADDR and out[0].flow == Flow(0, *A_ADDR)
    assert out[0].transport == "tcp"


def test_a_udp_caller_behind_nat_is_still_refused() -> None:
    call = Call(make_core(Hop(*GW, "udp")), "udp", contact_host="10.1.2.3")
    call.from_b("BYE")
    replies = call.take(GW)
    assert [o.data.split(b"\r\n")[0] for o in replies] == [b"SIP/2.0 403 Next Hop Not Allowed"]


@pytest.mark.parametrize(("takes_tcp", "transport"), [(True, "tcp"), (False, "udp")])
def test_large_invite_over_udp_goes_over_tcp_when_the_hop_takes_it(takes_tcp: bool,
                                                                   transport: str) -> None:
    """RFC 3261 §18.1.1: over 1300 bytes to a UDP gateway that also takes TCP → TCP (Via
    says so, no retransmissions); to one that does not → UDP, as before."""
    core = make_core(Hop(*GW, "udp"), takes_tcp=lambda host, port: takes_tcp)
    sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    call = Call(core, "udp", body=sdp + "a=x-pad:" + "p" * 1400 + "\r\n")
    assert call.invite_out.transport == transport
    assert call.invite.top_via.transport == transport.upper()
    assert len(call.invite_out.data) > 1300
    assert (core.stats.get("large_requests_over_tcp") == 1) is takes_tcp
    # the record-route still names B's leg as configured (UDP): one entry
    assert len(call.b_routes) == 1


def test_large_bye_over_udp_becomes_a_transaction_over_tcp() -> None:
    core = make_core(Hop(*GW, "udp"), takes_tcp=lambda host, port: True)
    call = Call(core, "udp")
    call.from_a("INFO", body="x" * 1500)
    (info,) = call.take(GW)
    assert info.transport == "tcp" and parse_message(info.data).top_via.transport == "TCP"
    assert core.stats.get("forwarded_stateless") is None
    call.from_a("BYE", cseq=3)  # a small one stays stateless over UDP
    (bye,) = call.take(GW)
    assert bye.transport == "udp" and core.stats.get("forwarded_stateless") == 1


def test_small_requests_never_ask_whether_the_hop_takes_tcp() -> None:
    asked: list[tuple[str, int]] = []
    core = make_core(Hop(*GW, "udp"), takes_tcp=lambda host, port: bool(asked.append((host,
                                                                                        port))))
    call = Call(core, "udp")
    call.from_a("BYE")
    assert asked == [] and call.take(GW)[0].transport == "udp"
