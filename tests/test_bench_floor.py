"""The floor forwarder (scripts/bench_floor.py) does the harness's job: else its figures mean
nothing. One call's messages as SIPp sends them, through its sans-IO part."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_floor", ROOT / "scripts" / "bench_floor.py")
assert _spec is not None and _spec.loader is not None
bench_floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_floor)

A, X, B = b"13800000007", b"700100000000008", b"13900012345"
ME, CARRIER, CALLER = ("127.0.0.1", 15060), ("127.0.0.1", 15070), ("127.0.0.1", 15080)
LEAK = re.compile(rb"[^0-9a-zA-Z](\+?(00)?86)?138[0-9]{8}([^0-9a-zA-Z]|$)")  # uas.xml's check


def _floor() -> object:
    return bench_floor.Floor({(X, A): B, (X, B): A}, ME, CARRIER, bytes(32))


def _invite(caller: bytes = A) -> bytes:
    return (b"INVITE sip:" + X + b"@127.0.0.1:15060 SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP 127.0.0.1:15080;branch=z9hG4bK-1-0\r\n"
            b"From: <sip:" + caller + b"@127.0.0.1>;tag=1SIPpTag001\r\n"
            b"To: <sip:" + X + b"@127.0.0.1:15060>\r\n"
            b"Call-ID: 1-77@127.0.0.1\r\nCSeq: 1 INVITE\r\n"
            b"Contact: <sip:uac@127.0.0.1:15080>\r\n"
            b"P-Asserted-Identity: <sip:" + caller + b"@127.0.0.1>\r\n"
            b"X-Bench-Id: 7\r\nMax-Forwards: 70\r\n"
            b"Content-Type: application/sdp\r\nContent-Length: 4\r\n\r\nv=0\n")


def _answer(forwarded: bytes, code: bytes, fold: bool = True) -> bytes:
    """The callee's response, as uas.xml builds it from the request it got: SIPp's
    [last_Via:] folds the Vias into one row (`fold`), a proxy may get them row by row too."""
    head = forwarded.split(b"\r\n\r\n")[0]
    rows = [r for r in head.split(b"\r\n")[1:]
            if r.startswith((b"Via:", b"From:", b"To:", b"Call-ID:", b"CSeq:", b"Record-Route:"))]
    if fold:
        vias = [r[5:] for r in rows if r.startswith(b"Via: ")]
        rows = [b"Via: " + b", ".join(vias)] + [r for r in rows if not r.startswith(b"Via:")]
    rows = [r + b";tag=2SIPpTag011" if r.startswith(b"To:") else r for r in rows]
    return (b"SIP/2.0 " + code + b"\r\n" + b"\r\n".join(rows)
            + b"\r\nContact: <sip:127.0.0.1:15070;transport=UDP>\r\nContent-Length: 0\r\n\r\n")


def test_a_call_is_translated_both_ways_and_in_dialog_without_state() -> None:
    floor = _floor()
    out = floor.handle(_invite(), CALLER)
    assert out is not None
    invite, to = out
    assert to == CARRIER
    assert invite.startswith(b"INVITE sip:" + B + b"@127.0.0.1:15070 SIP/2.0\r\n")
    assert b"\r\nFrom: <sip:" + X + b"@127.0.0.1>;tag=1SIPpTag001\r\n" in invite
    assert b"\r\nP-Asserted-Identity: <sip:" + X + b"@127.0.0.1>\r\n" in invite
    assert LEAK.search(invite) is None and A not in invite
    assert b"X-Bench-Id: 7\r\n" in invite and invite.endswith(b"\r\n\r\nv=0\n")
    assert invite.split(b"\r\n")[1].startswith(b"Via: SIP/2.0/UDP 127.0.0.1:15060;branch=z9hG4bK")
    rr = re.search(rb"Record-Route: <(sip:127\.0\.0\.1:15060;lr;t=[^>]+)>", invite)
    assert rr is not None

    for fold in (True, False):
        ok, to = floor.handle(_answer(invite, b"200 OK", fold), CARRIER)
        assert to == CALLER
        assert b"\r\nFrom: <sip:" + A + b"@127.0.0.1>;tag=1SIPpTag001\r\n" in ok
        assert b"\r\nVia: SIP/2.0/UDP 127.0.0.1:15080;branch=z9hG4bK-1-0\r\n" in ok
        assert ok.count(b"Via:") == 1 and b"15060;branch" not in ok

    bye = (b"BYE sip:127.0.0.1:15070;transport=UDP SIP/2.0\r\n"
           b"Via: SIP/2.0/UDP 127.0.0.1:15080;branch=z9hG4bK-1-2\r\n"
           b"Route: <" + rr.group(1) + b">\r\n"
           b"From: <sip:" + A + b"@127.0.0.1>;tag=1SIPpTag001\r\n"
           b"To: <sip:" + X + b"@127.0.0.1:15060>;tag=2SIPpTag011\r\n"
           b"Call-ID: 1-77@127.0.0.1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n")
    forwarded, to = floor.handle(bye, CALLER)
    assert to == CARRIER
    assert b"Route:" not in forwarded and A not in forwarded
    assert b"\r\nFrom: <sip:" + X + b"@127.0.0.1>;tag=1SIPpTag001\r\n" in forwarded
    done, to = floor.handle(_answer(forwarded, b"200 OK"), CARRIER)
    assert to == CALLER and b"\r\nFrom: <sip:" + A + b"@" in done


def test_an_unknown_caller_gets_a_404_and_a_forged_token_nothing() -> None:
    floor = _floor()
    refused, to = floor.handle(_invite(b"13899990000"), CALLER)
    assert to == CALLER and refused.startswith(b"SIP/2.0 404 ")
    assert b"CSeq: 1 INVITE" in refused and b"Call-ID: 1-77@127.0.0.1" in refused

    invite, _ = floor.handle(_invite(), CALLER)
    response = _answer(invite, b"180 Ringing")
    at = response.find(b"branch=z9hG4bK") + 14
    flipped = b"A" if response[at:at + 1] != b"A" else b"B"
    forged = response[:at] + flipped + response[at + 1:]
    assert floor.handle(forged, CARRIER) is None
    # where it sends is not the parties' to choose: a BYE aimed elsewhere, a Via off loopback
    rr = re.search(rb"Record-Route: <([^>]+)>", invite)
    assert rr is not None
    elsewhere = (b"BYE sip:127.0.0.9:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:15080;branch=z9\r\n"
                 b"Route: <" + rr.group(1) + b">\r\nFrom: <sip:" + A + b"@127.0.0.1>;tag=t\r\n"
                 b"Call-ID: 1-77@127.0.0.1\r\nCSeq: 2 BYE\r\n\r\n")
    assert floor.handle(elsewhere, CALLER) is None
    to_carrier = elsewhere.replace(b"127.0.0.9:5060", b"127.0.0.1:15070")
    assert floor.handle(to_carrier, CALLER) is not None
    offsite = response.replace(b", SIP/2.0/UDP 127.0.0.1:15080", b", SIP/2.0/UDP 10.1.2.3:5060")
    assert floor.handle(offsite, CARRIER) is None
    assert floor.handle(response, CARRIER) is not None
    assert floor.handle(b"BYE sip:127.0.0.1:15070 SIP/2.0\r\nCall-ID: x\r\n\r\n", CALLER) is None
    for garbage in (b"", b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n", b"\xff" * 40,
                    b"INVITE sip:" + X + b"@h SIP/2.0\r\nFrom: <sip:" + A + b"@h>\r\n",
                    response.replace(b", SIP/2.0/UDP 127.0.0.1:15080", b", x")):
        assert floor.handle(garbage, CALLER) is None


def test_the_harness_bindings_file_is_read_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "bindings.yaml"
    path.write_text('bindings:\n  - {type: axb, x: "700100000000001", a: "13800000000", '
                    'b: "13900012345", ttl: 86400}\n')
    table = bench_floor.load_bindings(path)
    assert table == {(b"700100000000001", b"13800000000"): b"13900012345",
                     (b"700100000000001", b"13900012345"): b"13800000000"}
