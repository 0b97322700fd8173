"""Trust and privacy hardening, attacked from the wire: the dialog token is no open-relay ticket,
nothing a party can forge unhides a number, the proxy's own answers and every odd number form stay
private, Contact/Call-ID rewrites are reversible, bodies that cannot be read do not pass.

Real processes: the proxy (`python -m proxy run`, memory store, `workers: 1` and `workers: 2`,
one process per config variant, shared by the tests that use that config). Every SIP peer is a
plain UDP socket driven byte by byte (tests/integration/rawsip.py): A on 127.0.0.1, B bound on
the carrier gateway's port, an untrusted attacker on 127.0.0.7, an untrusted host on 127.0.0.9.
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.config import check_config
from proxy.sip.address import parse_name_addr
from proxy.sip.message import SipMessage, parse_message
from proxy.sip.uri import OtherUri, SipUri
from tests.integration.procs import (
    ProxyProcess,
    free_port,
    start_on_fresh_ports,
    write_config,
)
from tests.integration.rawsip import (
    A,
    B,
    Dialog,
    Peer,
    Received,
    X,
    ack_failure,
    answer_call,
    bcd,
    build_request,
    describe,
    establish,
    is_request,
    is_response,
    isup_iam,
    leaks,
    row_of,
    sdp,
    start_call,
    uniq,
)

QUIET = 0.3  # whatever the proxy forwards arrives well within this (loopback, idle proxy)
REPLY_WAIT = 2.0
OUTSIDER = "13312345678"  # a number in no binding: where an open relay would put the call

DEFAULT: dict = {}
DEADLINE = {"privacy": {"max_dialog_s": 2}}
NO_PAI = {"privacy": {"add_asserted_identity": False}}
REFER_PASS = {"privacy": {"refer": "pass"}}
NEXT_HOP_9 = {"allowed_next_hops": ["127.0.0.9/32"]}
BODY_REJECT = {"privacy": {"unreadable_body": "reject"}}


# ---- proxies: one per (workers, config), shared by the module ------------------------------------

@dataclass
class Rig:
    """A running proxy with A (127.0.0.1) and B (on the gateway port) as raw SIP peers."""

    proxy: ProxyProcess
    a: Peer
    b: Peer
    workers: int

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.proxy.port)


def _wait_ready(port: int, timeout: float = 10.0) -> None:
    """Every worker answers: OPTIONS from several sources and Call-IDs (SO_REUSEPORT spreads
    by source; workers own Call-IDs by hash) until each has an answer."""
    peers = [Peer() for _ in range(6)]
    try:
        for p in peers:
            p.send(build_request("OPTIONS", f"sip:127.0.0.1:{port}", [
                ("Via", f"SIP/2.0/UDP 127.0.0.1:{p.port};branch={uniq('z9hG4bKo')};rport"),
                ("Max-Forwards", "70"), ("From", f"<sip:ping@127.0.0.1>;tag={uniq('p')}"),
                ("To", "<sip:127.0.0.1>"), ("Call-ID", uniq("ping")), ("CSeq", "1 OPTIONS")]),
                ("127.0.0.1", port))
        deadline = time.monotonic() + timeout
        for p in peers:
            if p.wait(is_response(final=True), max(deadline - time.monotonic(), 0)) is None:
                raise RuntimeError(f"proxy on {port} did not answer OPTIONS within {timeout}s")
    finally:
        for p in peers:
            p.close()


@dataclass
class Rigs:
    tmp: Path
    workers: int
    started: dict[str, Rig] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def get(self, overrides: dict) -> Rig:
        """The proxy for `overrides` (started on first use); fails the test when the config is
        refused (a key today's proxy does not know yet)."""
        key = json.dumps(overrides, sort_keys=True)
        if key in self.refused:
            pytest.fail(self.refused[key])
        rig = self.started.get(key)
        if rig is not None:
            return rig

        def configure() -> tuple[Path, dict, int, int, Path]:
            tmp = Path(tempfile.mkdtemp(prefix="proxy", dir=self.tmp))  # never one reused
            port, gateway_port = free_port(), free_port()
            path, config = write_config(tmp, port=port, gateway_port=gateway_port,
                                        overrides={"workers": self.workers, **overrides},
                                        transports=("udp",))
            problems = check_config(path)
            if problems:
                self.refused[key] = f"the proxy refuses config {overrides}: {problems}"
                pytest.fail(self.refused[key])
            return path, config, port, gateway_port, tmp / "proxy.log"

        proxy = start_on_fresh_ports(configure)
        rig = Rig(proxy, Peer(name="A"), Peer(port=proxy.gateway_port, name="B"), self.workers)
        self.started[key] = rig
        _wait_ready(proxy.port)
        return rig

    def close(self) -> list[str]:
        problems = []
        for key, rig in self.started.items():
            rc = rig.proxy.stop()
            rig.a.close()
            rig.b.close()
            crashed = rig.proxy.crash_lines()
            if crashed:
                problems.append(f"proxy {key} logged internal errors:\n" + "\n".join(crashed[:10]))
            if rc not in (0, -15):
                problems.append(f"proxy {key} exited with {rc}")
        return problems


@pytest.fixture(scope="module", params=[1, 2], ids=["workers1", "workers2"])
def rigs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Rigs]:
    pool = Rigs(tmp_path_factory.mktemp(f"attacks-w{request.param}"), request.param)
    yield pool
    problems = pool.close()
    assert not problems, "\n".join(problems)


@pytest.fixture
def rig(rigs: Rigs) -> Rig:
    return rigs.get(DEFAULT)


@pytest.fixture
def outsiders() -> Iterator[list[Peer]]:
    """Sockets a test binds on other loopback addresses; closed afterwards."""
    made: list[Peer] = []
    yield made
    for p in made:
        p.close()


def outsider(made: list[Peer], host: str, name: str) -> Peer:
    p = Peer(host, name=name)
    made.append(p)
    return p


# ---- helpers -------------------------------------------------------------------------------------

def final_reply(peer: Peer, method: str, timeout: float = REPLY_WAIT) -> Received | None:
    return peer.wait(is_response(method=method, final=True), timeout)


def status_of(reply: Received | None) -> str:
    return "no answer" if reply is None else reply.msg.start_line.decode("latin-1")


def new_invite(sender: Peer, ruri: str, *, route: str | None, to_tag: str | None = None,
               call_id: str | None = None) -> bytes:
    """An INVITE that is not part of any dialog of ours (fresh Call-ID)."""
    to = f"<{ruri.split(';')[0]}>" + (f";tag={to_tag}" if to_tag else "")
    body = sdp(OUTSIDER)
    rows = [
        ("Via", f"SIP/2.0/UDP {sender.host}:{sender.port};branch={uniq('z9hG4bKx')};rport"),
        ("Max-Forwards", "70"),
        *((("Route", route),) if route else ()),
        ("From", f"<sip:{OUTSIDER}@{sender.host}>;tag={uniq('x')}"),
        ("To", to),
        ("Call-ID", call_id or f"{uniq('forged')}@{sender.host}"),
        ("CSeq", "1 INVITE"),
        ("Contact", f"<sip:{OUTSIDER}@{sender.host}:{sender.port}>"),
        ("Content-Type", "application/sdp"),
    ]
    return build_request("INVITE", ruri, rows, body)


def our_record_route(d: Dialog) -> str:
    assert d.ok_at_a is not None
    rr = d.ok_at_a.msg.header_values("record-route")
    assert rr, "the 200 A got has no Record-Route"
    return rr[0]


def leak_report(messages: list[Received], number: str) -> str:
    out = []
    for got in messages:
        hits = leaks(got.raw, number)
        if hits:
            out.append(f"{got}: " + " | ".join(h.strip() for h in hits[:4]))
    return "\n".join(out)


def contact_uri(msg: SipMessage) -> SipUri | OtherUri:
    value = msg.header("contact")
    assert value is not None, f"no Contact in {msg.start_line!r}"
    return parse_name_addr(value, "Contact").uri


# ---- 1. the dialog token is no open-relay ticket -------------------------------------------------

def test_untrusted_host_cannot_start_a_call_with_our_route(
        rig: Rig, outsiders: list[Peer]) -> None:
    """A new INVITE (no To tag) from untrusted 127.0.0.7 carrying a real call's Record-Route as
    its Route, to a number of the attacker's choice at the attacker's host: 403, and it reaches
    neither the attacker's listener nor the carrier leg."""
    d = establish(rig.port, rig.a, rig.b)
    attacker = outsider(outsiders, "127.0.0.7", "attacker")
    listener = outsider(outsiders, "127.0.0.7", "attacker listener")
    rig.b.drain()
    data = new_invite(attacker, f"sip:+86{OUTSIDER}@127.0.0.7:{listener.port}",
                      route=our_record_route(d))
    attacker.send(data, rig.addr)
    reply = final_reply(attacker, "INVITE")
    relayed = listener.quiet(QUIET) + rig.b.quiet(0)
    assert reply is not None and reply.msg.status == 403 and not relayed, (
        f"untrusted INVITE with a stolen Route: answer {status_of(reply)!r} (want 403), "
        f"forwarded: {describe(relayed)}")
    ack_failure(attacker, data, reply, rig.addr)
    d.bye_from_a()


def test_trusted_host_with_our_route_but_no_to_tag_is_an_initial_request(
        rig: Rig, outsiders: list[Peer]) -> None:
    """The same stolen Route from a trusted host (127.0.0.1), to an outside number at the
    gateway: a request without a To tag is initial whatever its Route says, so 404 (not a middle
    number) and nothing reaches the carrier leg."""
    d = establish(rig.port, rig.a, rig.b)
    trusted = outsider(outsiders, "127.0.0.1", "trusted host")
    rig.b.drain()
    data = new_invite(trusted, f"sip:+86{OUTSIDER}@127.0.0.1:{rig.proxy.gateway_port}",
                      route=our_record_route(d))
    trusted.send(data, rig.addr)
    reply = final_reply(trusted, "INVITE")
    relayed = rig.b.quiet(QUIET)
    assert reply is not None and reply.msg.status == 404 and not relayed, (
        f"trusted INVITE without To tag but with our Route: answer {status_of(reply)!r} "
        f"(want 404 Not A Middle Number), forwarded to B: {describe(relayed)}")
    ack_failure(trusted, data, reply, rig.addr)
    d.bye_from_a()


@pytest.mark.parametrize("method", ["INVITE", "BYE"])
def test_token_is_bound_to_its_call_id(rig: Rig, method: str) -> None:
    """A valid token with a To tag, on another Call-ID, from the trusted caller itself, towards
    the gateway: 403, nothing forwarded."""
    d = establish(rig.port, rig.a, rig.b)
    rig.b.drain()
    other_call = f"{uniq('other')}@127.0.0.1"
    headers = [("Contact", f"<sip:{A}@127.0.0.1:{rig.a.port}>")]
    if method == "INVITE":
        headers.append(("Content-Type", "application/sdp"))
    sent = d.request_from_a(method, ruri=f"sip:+86{OUTSIDER}@127.0.0.1:{rig.proxy.gateway_port}",
                            call_id=other_call, headers=headers,
                            body=sdp(A, 2) if method == "INVITE" else b"")
    reply = final_reply(rig.a, method)
    relayed = rig.b.quiet(QUIET)
    assert reply is not None and reply.msg.status == 403 and not relayed, (
        f"{method} with a real token on Call-ID {other_call}: answer {status_of(reply)!r} "
        f"(want 403), forwarded to B: {describe(relayed)}")
    if method == "INVITE":
        ack_failure(rig.a, sent, reply, rig.addr)
    d.bye_from_a()


def test_in_dialog_request_from_untrusted_host_gets_403(
        rig: Rig, outsiders: list[Peer]) -> None:
    """Everything right (Call-ID, tags, valid token, Request-URI) but sent from untrusted
    127.0.0.7: a re-INVITE and a BYE get 403 and never reach B; A's own BYE still works."""
    d = establish(rig.port, rig.a, rig.b)
    attacker = outsider(outsiders, "127.0.0.7", "attacker")
    problems = []
    for method in ("INVITE", "BYE"):
        rig.b.drain()
        sent = d.request_from_a(
            method, sender=attacker,
            headers=[("Content-Type", "application/sdp")] if method == "INVITE" else [],
            body=sdp(A, 2) if method == "INVITE" else b"")
        reply = final_reply(attacker, method)
        relayed = rig.b.quiet(QUIET)
        if reply is None or reply.msg.status != 403 or relayed:
            problems.append(f"{method} from 127.0.0.7: answer {status_of(reply)!r} (want 403), "
                            f"forwarded to B: {describe(relayed)}")
        if reply is not None and method == "INVITE":
            ack_failure(attacker, sent, reply, rig.addr)
    assert not problems, "\n".join(problems)
    d.request_from_a("BYE")
    bye = rig.b.wait(is_request("BYE"))
    assert bye is not None, "A's own BYE did not reach B after the attack"
    rig.b.answer(bye, 200, "OK")


def test_token_deadline_leaves_only_bye(rigs: Rigs) -> None:
    """privacy.max_dialog_s: 2 — after 3 s a re-INVITE in the dialog gets 403 and reaches
    nobody, a BYE still reaches the other side."""
    rig = rigs.get(DEADLINE)
    d = establish(rig.port, rig.a, rig.b)
    time.sleep(3)
    rig.b.drain()
    sent = d.request_from_a("INVITE", headers=[("Content-Type", "application/sdp")],
                            body=sdp(A, 2))
    reply = final_reply(rig.a, "INVITE")
    relayed = rig.b.quiet(QUIET)
    for got in relayed:  # do not leave B's side of a wrongly forwarded re-INVITE hanging
        if got.msg.is_request and got.msg.method == "INVITE":
            rig.b.answer(got, 488, "Not Here")
    if reply is not None and reply.msg.status >= 300:
        ack_failure(rig.a, sent, reply, rig.addr)
    d.request_from_a("BYE")
    bye = rig.b.wait(is_request("BYE"))
    if bye is not None:
        rig.b.answer(bye, 200, "OK")
    assert reply is not None and reply.msg.status == 403 and not relayed, (
        f"re-INVITE 3 s into a dialog with max_dialog_s 2: answer {status_of(reply)!r} "
        f"(want 403), forwarded to B: {describe(relayed)}")
    assert bye is not None, "BYE after the deadline did not reach B"
    ok = rig.a.wait(is_response(200, "BYE"))
    assert ok is not None, "B's 200 to the late BYE did not reach A"


# ---- 2. a forged From tag unhides nothing --------------------------------------------------------

def test_callee_spoofing_the_callers_from_tag_learns_nothing(rig: Rig) -> None:
    """B sends a re-INVITE whose From tag is A's (B sees it in every request). A answers 200
    with its own number in Contact and SDP o=: the 200 B gets carries no form of A's number, and
    the re-INVITE A gets carries none of B's."""
    d = establish(rig.port, rig.a, rig.b)
    spoofed = d.b_from.replace(f";tag={d.b_tag}", f";tag={d.a_tag}")
    assert d.a_tag in spoofed
    d.request_from_b("INVITE", from_=spoofed,
                     headers=[("Contact", f"<sip:{B}@127.0.0.1:{rig.b.port}>"),
                              ("Content-Type", "application/sdp")], body=sdp(B, 2))
    reinvite = rig.a.wait(is_request("INVITE"))
    assert reinvite is not None, (
        f"B's re-INVITE (From tag = A's) never reached A; B got {describe(rig.b.pending)}")
    rig.a.answer(reinvite, 200, "OK",
                 headers=[("Contact", f"<sip:{A}@127.0.0.1:{rig.a.port}>"),
                          ("Content-Type", "application/sdp")], body=sdp(A, 2))
    ok = rig.b.wait(is_response(200, "INVITE"))
    assert ok is not None, f"A's 200 never reached B; B got {describe(rig.b.pending)}"
    problems = [f"B learns A's number:\n{r}" for r in [leak_report([ok], A)] if r]
    problems += [f"A learns B's number:\n{r}" for r in [leak_report([reinvite], B)] if r]
    assert not problems, "\n".join(problems)


# ---- 3. the proxy's own answers ------------------------------------------------------------------

def test_proxys_error_reply_is_built_from_the_request_as_received(rig: Rig) -> None:
    """An in-dialog request from B with an unroutable Request-URI (tel:X): the error reply
    carries B's To row byte for byte and no form of A's number."""
    d = establish(rig.port, rig.a, rig.b)
    sent = d.request_from_b("INFO", ruri=f"tel:{X}")
    to_sent = row_of(parse_message(sent), "to")
    reply = final_reply(rig.b, "INFO")
    relayed = rig.a.quiet(0.05)
    for got in relayed:
        if got.msg.is_request and got.msg.method == "INFO":
            rig.a.answer(got, 200, "OK")
    assert reply is not None and 400 <= reply.msg.status < 600, (
        f"INFO to tel:{X}: answer {status_of(reply)!r} (want an error), "
        f"A got {describe(relayed)}")
    problems = []
    if row_of(reply.msg, "to") != to_sent:
        problems.append(f"To row changed: sent {to_sent!r}, got back {row_of(reply.msg, 'to')!r}")
    if leaks(reply.raw, A):
        problems.append("the error reply carries A's number:\n" + leak_report([reply], A))
    assert not problems, "\n".join(problems)
    d.bye_from_a()


# ---- 4. number forms a literal search misses -----------------------------------------------------

SCANNER_FORMS = {
    "reason_phrase": {"ringing_reason": f"Ringing {B}"},
    "tel_contact_with_separators": {"contact_b": "<tel:+86-139-0000-0001>"},
    "escaped_sip_contact": {"contact_b": "<sip:%31%33%39%30%30%30%30%30%30%30%31@127.0.0.1:{bp}>"},
    "display_name": {"contact_b": '"139 0000 0001" <sip:callee@127.0.0.1:{bp}>'},
}


@pytest.mark.parametrize("form", list(SCANNER_FORMS))
def test_callee_number_forms_never_reach_the_caller(rig: Rig, form: str) -> None:
    """B answers with its number in a form a literal search misses (reason phrase, tel: with
    separators, %-escaped user, display name with spaces): A receives no form of it."""
    kw = {k: v.replace("{bp}", str(rig.b.port)) for k, v in SCANNER_FORMS[form].items()}
    d = establish(rig.port, rig.a, rig.b, ack=False, **kw)
    got = d.a_received()
    report = leak_report(got, B)
    assert not report, f"A learns B's number ({form}):\n{report}"


def test_call_id_carrying_the_callers_number_is_mapped_both_ways(rig: Rig) -> None:
    """A's Call-ID holds A's number: B sees another Call-ID (without it), every message A gets
    has A's Call-ID exactly, every message B gets the one B saw in the INVITE."""
    call_id = f"{A}-4711@127.0.0.1"
    d = establish(rig.port, rig.a, rig.b, call_id=call_id, ack=False)
    problems = []
    if d.b_call_id == call_id or leaks(d.b_call_id.encode(), A):
        problems.append(f"B sees Call-ID {d.b_call_id!r} (A sent {call_id!r})")
    for got in d.a_received():
        if got.msg.call_id != call_id:
            problems.append(f"A got {got} with Call-ID {got.msg.call_id!r}")
    ack = d.ack_from_a()
    if ack.msg.call_id != d.b_call_id:
        problems.append(f"ACK reached B with Call-ID {ack.msg.call_id!r}, not {d.b_call_id!r}")
    d.request_from_a("INVITE", headers=[("Contact", f"<sip:{A}@127.0.0.1:{rig.a.port}>"),
                                        ("Content-Type", "application/sdp")], body=sdp(A, 2))
    reinvite = rig.b.wait(is_request("INVITE"))
    assert reinvite is not None, "A's re-INVITE never reached B\n" + "\n".join(problems)
    if reinvite.msg.call_id != d.b_call_id:
        problems.append(f"re-INVITE reached B with Call-ID {reinvite.msg.call_id!r}, "
                        f"not {d.b_call_id!r}")
    rig.b.answer(reinvite, 200, "OK", headers=[("Contact", f"<sip:{B}@127.0.0.1:{rig.b.port}>"),
                                               ("Content-Type", "application/sdp")],
                 body=sdp(B, 2))
    ok = rig.a.wait(is_response(200, "INVITE"))
    assert ok is not None, "B's 200 to the re-INVITE never reached A\n" + "\n".join(problems)
    if ok.msg.call_id != call_id:
        problems.append(f"200 (re-INVITE) reached A with Call-ID {ok.msg.call_id!r}")
    d.request_from_a("ACK", cseq=ok.msg.cseq[0])
    ack2 = rig.b.wait(is_request("ACK"))
    if ack2 is None or ack2.msg.call_id != d.b_call_id:
        problems.append(f"second ACK at B: {ack2 and ack2.msg.call_id!r}")
    d.request_from_b("BYE")
    bye = rig.a.wait(is_request("BYE"))
    assert bye is not None, "B's BYE never reached A\n" + "\n".join(problems)
    if bye.msg.call_id != call_id:
        problems.append(f"B's BYE reached A with Call-ID {bye.msg.call_id!r}, not {call_id!r}")
    rig.a.answer(bye, 200, "OK")
    bye_ok = rig.b.wait(is_response(200, "BYE"))
    if bye_ok is None or bye_ok.msg.call_id != d.b_call_id:
        problems.append(f"200 (BYE) at B: {bye_ok and bye_ok.msg.call_id!r}")
    assert not problems, "\n".join(problems)


# ---- 5. Contact is rewritten reversibly ----------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "+86"], ids=["national", "plus86"])
def test_contact_rewrite_is_reversible(rig: Rig, prefix: str) -> None:
    """A's Contact reaches B with user X and a sealed parameter; B's request to it reaches A with
    A's Contact URI exactly. The same for B's Contact seen by A (ACK and INFO from A)."""
    a_uri = f"sip:{prefix}{A}@127.0.0.1:{rig.a.port}"
    b_uri = f"sip:{prefix}{B}@127.0.0.1:{rig.b.port}"
    d = establish(rig.port, rig.a, rig.b, contact=f"<{a_uri}>", contact_b=f"<{b_uri}>",
                  ack=False)
    assert d.invite_at_b is not None and d.ok_at_a is not None
    problems = []
    for side, msg in (("B", d.invite_at_b.msg), ("A", d.ok_at_a.msg)):
        uri = contact_uri(msg)
        if getattr(uri, "user", None) != X or not getattr(uri, "params", ""):
            problems.append(f"{side} sees Contact {uri} (want user {X} and a sealed parameter)")
    ack = d.ack_from_a()
    if ack.msg.uri_text != b_uri:
        problems.append(f"A's ACK reached B as {ack.msg.uri_text!r}, want {b_uri!r}")
    d.request_from_a("INFO")
    info = rig.b.wait(is_request("INFO"))
    if info is None:
        problems.append("A's INFO never reached B")
    else:
        rig.b.answer(info, 200, "OK")
        if info.msg.uri_text != b_uri:
            problems.append(f"A's INFO reached B as {info.msg.uri_text!r}, want {b_uri!r}")
        rig.a.wait(is_response(200, "INFO"))
    d.request_from_b("BYE")
    bye = rig.a.wait(is_request("BYE"))
    if bye is None:
        problems.append("B's BYE never reached A")
    else:
        rig.a.answer(bye, 200, "OK")
        if bye.msg.uri_text != a_uri:
            problems.append(f"B's BYE reached A as {bye.msg.uri_text!r}, want {a_uri!r}")
    assert not problems, "\n".join(problems)


# ---- 6. P-Asserted-Identity ----------------------------------------------------------------------

def test_asserted_identity_added_when_caller_sent_none(rig: Rig) -> None:
    """A's INVITE without P-Asserted-Identity reaches B with P-Asserted-Identity: <sip:X@…>."""
    d = establish(rig.port, rig.a, rig.b, pai=False)
    assert d.invite_at_b is not None
    pais = d.invite_at_b.msg.header_values("p-asserted-identity")
    users = [getattr(parse_name_addr(v, "PAI").uri, "user", None) for v in pais]
    assert users == [X], f"B got P-Asserted-Identity {pais} (want exactly one, user {X})"
    d.bye_from_a()


def test_asserted_identity_not_added_when_disabled(rigs: Rigs) -> None:
    """privacy.add_asserted_identity: false — none is added."""
    rig = rigs.get(NO_PAI)
    d = establish(rig.port, rig.a, rig.b, pai=False)
    assert d.invite_at_b is not None
    pais = d.invite_at_b.msg.header_values("p-asserted-identity")
    assert pais == [], f"B got P-Asserted-Identity {pais} with add_asserted_identity: false"
    d.bye_from_a()


# ---- 7. Via received / rport (RFC 3581) ----------------------------------------------------------

def test_via_gets_received_and_rport_stamped(rig: Rig) -> None:
    """A's Via (;rport) reaches B with rport=<A's port> and received=127.0.0.1; a refusal reaches
    A with rport filled in too."""
    d = establish(rig.port, rig.a, rig.b)
    assert d.invite_at_b is not None
    vias = d.invite_at_b.msg.vias
    problems = []
    if len(vias) < 2:
        problems.append(f"B got {len(vias)} Via")
    elif vias[1].rport != str(rig.a.port) or vias[1].received != "127.0.0.1":
        problems.append(f"A's Via at B: {vias[1]} (want rport={rig.a.port};received=127.0.0.1)")
    d.bye_from_a()
    _, sent = start_call(rig.port, rig.a, rig.b, x="700100000000099")
    reply = final_reply(rig.a, "INVITE", 5.0)
    if reply is None or reply.msg.status != 404:
        problems.append(f"INVITE to an unbound X: answer {status_of(reply)!r} (want 404)")
    if reply is not None:
        ack_failure(rig.a, sent, reply, rig.addr)
        top = reply.msg.top_via
        if top.rport != str(rig.a.port):
            problems.append(f"the refusal's Via: {top} (want rport={rig.a.port})")
    assert not problems, "\n".join(problems)


# ---- 8. REFER ------------------------------------------------------------------------------------

REFER_HEADERS = [("Refer-To", f"<sip:{OUTSIDER}@127.0.0.1>"),
                 ("Referred-By", f"<sip:{A}@127.0.0.1>")]


def test_refer_is_refused_by_default(rig: Rig) -> None:
    """An in-dialog REFER from A: 403, nothing reaches B."""
    d = establish(rig.port, rig.a, rig.b)
    rig.b.drain()
    d.request_from_a("REFER", headers=[*REFER_HEADERS,
                                       ("Contact", f"<sip:{A}@127.0.0.1:{rig.a.port}>")])
    reply = final_reply(rig.a, "REFER")
    relayed = rig.b.quiet(QUIET)
    for got in relayed:
        if got.msg.is_request and got.msg.method == "REFER":
            rig.b.answer(got, 603, "Decline")
    assert reply is not None and reply.msg.status == 403 and not relayed, (
        f"REFER: answer {status_of(reply)!r} (want 403), forwarded to B: {describe(relayed)}")
    d.bye_from_a()


def test_refer_passes_when_allowed_without_the_referrers_number(rigs: Rigs) -> None:
    """privacy.refer: pass — the REFER reaches B, its Referred-By without A's number."""
    rig = rigs.get(REFER_PASS)
    d = establish(rig.port, rig.a, rig.b)
    d.request_from_a("REFER", headers=[*REFER_HEADERS,
                                       ("Contact", f"<sip:{A}@127.0.0.1:{rig.a.port}>")])
    refer = rig.b.wait(is_request("REFER"))
    assert refer is not None, f"REFER never reached B; A got {describe(rig.a.pending)}"
    rig.b.answer(refer, 202, "Accepted")
    referred_by = row_of(refer.msg, "referred-by")
    problems = []
    if referred_by is not None and leaks(referred_by, A):
        problems.append(f"Referred-By at B: {referred_by!r}")
    if leaks(refer.raw, A):
        problems.append("the REFER at B carries A's number:\n" + leak_report([refer], A))
    assert not problems, "\n".join(problems)
    d.bye_from_a()


# ---- 9. the next hop must be a gateway, a trusted peer or an allowed hop -------------------------

def test_in_dialog_request_to_a_foreign_host_is_refused(rig: Rig,
                                                        outsiders: list[Peer]) -> None:
    """A BYE whose Request-URI points at 127.0.0.9 (neither trusted nor a gateway): 403, nothing
    arrives there."""
    far = outsider(outsiders, "127.0.0.9", "127.0.0.9")
    d = establish(rig.port, rig.a, rig.b)
    d.request_from_a("BYE", ruri=f"sip:{B}@127.0.0.9:{far.port}")
    reply = final_reply(rig.a, "BYE")
    arrived = far.quiet(QUIET)
    for got in arrived:
        if got.msg.is_request:
            far.answer(got, 200, "OK")
    assert reply is not None and reply.msg.status == 403 and not arrived, (
        f"BYE to 127.0.0.9: answer {status_of(reply)!r} (want 403), "
        f"arrived at 127.0.0.9: {describe(arrived)}")
    d.bye_from_a()


def test_in_dialog_request_to_an_allowed_next_hop_passes(rigs: Rigs,
                                                         outsiders: list[Peer]) -> None:
    """allowed_next_hops: [127.0.0.9/32] — the same BYE arrives at 127.0.0.9."""
    rig = rigs.get(NEXT_HOP_9)
    far = outsider(outsiders, "127.0.0.9", "127.0.0.9")
    d = establish(rig.port, rig.a, rig.b)
    d.request_from_a("BYE", ruri=f"sip:{B}@127.0.0.9:{far.port}")
    bye = far.wait(is_request("BYE"))
    assert bye is not None, f"BYE never reached 127.0.0.9; A got {describe(rig.a.pending)}"
    far.answer(bye, 200, "OK")
    assert rig.a.wait(is_response(200, "BYE")) is not None, "the 200 never came back to A"


# ---- 10. bodies the proxy cannot read ------------------------------------------------------------

def test_compressed_body_is_dropped(rig: Rig) -> None:
    """An SDP with A's number, gzip-compressed (Content-Encoding: gzip): B gets no body."""
    d, _ = start_call(rig.port, rig.a, rig.b, headers=[("Content-Encoding", "gzip")],
                      body=gzip.compress(sdp(A)))
    d = answer_call(d)
    assert d.invite_at_b is not None
    msg = d.invite_at_b.msg
    assert (msg.body == b"" and msg.header("content-length") == "0"
            and not msg.has("content-encoding")), (
        f"B got Content-Length {msg.header('content-length')!r}, Content-Encoding "
        f"{msg.header('content-encoding')!r}, body {msg.body[:40]!r} (want no body)")
    d.bye_from_a()


def test_compressed_body_is_refused_when_configured(rigs: Rigs) -> None:
    """privacy.unreadable_body: reject — 415 to A, nothing to B."""
    rig = rigs.get(BODY_REJECT)
    _, sent = start_call(rig.port, rig.a, rig.b, headers=[("Content-Encoding", "gzip")],
                         body=gzip.compress(sdp(A)))
    reply = final_reply(rig.a, "INVITE")
    relayed = rig.b.quiet(QUIET)
    for got in relayed:
        if got.msg.is_request and got.msg.method == "INVITE":
            rig.b.answer(got, 488, "Not Here", to_tag=uniq("b"))
    if reply is not None:
        ack_failure(rig.a, sent, reply, rig.addr)
    assert reply is not None and reply.msg.status == 415 and not relayed, (
        f"gzip body with unreadable_body: reject: answer {status_of(reply)!r} (want 415), "
        f"forwarded to B: {describe(relayed)}")


BOUNDARY = "sip700-sipi-boundary"


def sip_i_body() -> bytes:
    """multipart/mixed: the SDP, then an application/isup IAM whose calling party is A."""
    return (
        f"--{BOUNDARY}\r\nContent-Type: application/sdp\r\n\r\n".encode() + sdp(A)
        + f"\r\n--{BOUNDARY}\r\nContent-Type: application/isup;version=itu-t92+;base=itu-t92+"
          "\r\nContent-Disposition: signal;handling=required\r\n\r\n".encode()
        + isup_iam(X, A) + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def test_sip_i_isup_part_is_stripped(rig: Rig) -> None:
    """A SIP-I INVITE (SDP + ISUP IAM with A as calling party number, BCD): B gets the SDP and no
    ISUP part, and A's number appears nowhere, in text or BCD."""
    a_bcd = bcd(A)
    body = sip_i_body()
    assert a_bcd in body and bcd(X) in body  # the IAM really carries both numbers
    d, _ = start_call(rig.port, rig.a, rig.b, headers=[("MIME-Version", "1.0")], body=body,
                      content_type=f"multipart/mixed;boundary={BOUNDARY}")
    d = answer_call(d)
    assert d.invite_at_b is not None
    raw, msg = d.invite_at_b.raw, d.invite_at_b.msg
    problems = []
    if b"m=audio" not in msg.body:
        problems.append(f"no SDP in the body B got: {msg.body[:200]!r}")
    if re.search(rb"(?i)application/isup", raw):
        problems.append("B got an application/isup part")
    if a_bcd in raw:
        problems.append(f"A's number in BCD ({a_bcd.hex()}) reaches B")
    if leaks(raw, A):
        problems.append("A's number reaches B:\n" + leak_report([d.invite_at_b], A))
    assert not problems, "\n".join(problems)
    d.bye_from_a()
