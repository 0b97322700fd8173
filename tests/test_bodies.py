"""What leaves in a message body: scrubbed text, no unreadable bytes, ISUP stripped or rewritten."""

from __future__ import annotations

import base64
import gzip

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.bodies import (
    BodyRefused,
    make_body_safe,
    parse_content_type,
    split_multipart,
)
from proxy.isup import CALLING_PARTY_NUMBER, decode_number_param, parse_isup
from proxy.sip.message import SipMessage, parse_message
from tests.test_isup import A_BCD, IAM_BODY

A, X = "13800000001", "700100000000001"
AB, XB = A.encode(), X.encode()


def scrub(data: bytes) -> tuple[bytes, int]:
    return data.replace(AB, XB), data.count(AB)


SDP = (
    f"v=0\r\no={A} 1 1 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 gw-{A}.example\r\nt=0 0\r\n"
    "m=audio 4000 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n"
).encode()


def message(*rows: str, body: bytes = b"") -> SipMessage:
    head = "\r\n".join((
        f"INVITE sip:{X}@10.0.0.1 SIP/2.0",
        "Via: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK1",
        f"From: <sip:{X}@10.0.0.2>;tag=a",
        f"To: <sip:{X}@10.0.0.1>",
        "Call-ID: c1",
        "CSeq: 1 INVITE",
        *rows,
        f"Content-Length: {len(body)}",
    ))
    return parse_message(head.encode() + b"\r\n\r\n" + body)


def wire_body(msg: SipMessage) -> bytes:
    """The body as the receiver frames it: Content-Length must be right."""
    again = parse_message(msg.serialize(), stream=True)
    assert again.body == msg.body
    return again.body


def multipart(boundary: str, *parts: bytes, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    dash = b"--" + boundary.encode()
    inner = b"".join(dash + b"\r\n" + part + b"\r\n" for part in parts)
    return preamble + inner + dash + b"--\r\n" + epilogue


SDP_PART = b"Content-Type: application/sdp\r\n\r\n" + SDP
ISUP_PART = (
    b"Content-Type: application/isup; version=itu-t92+\r\n"
    b"Content-Disposition: signal; handling=optional\r\n\r\n" + IAM_BODY
)
MIXED = "Content-Type: multipart/mixed; boundary=unique-boundary-1"


def removed(msg: SipMessage) -> bool:
    return (
        msg.body == b""
        and msg.header("content-length") == "0"
        and not any(msg.has(n) for n in ("content-type", "content-encoding",
                                         "content-disposition"))
    )


# ---- the fast paths ------------------------------------------------------------------------------

def test_empty_body_costs_nothing() -> None:
    msg = message()
    body, rows = msg.body, msg.rows
    assert make_body_safe(msg, scrub, x=X) == 0
    assert msg.body is body and msg.rows is rows


def test_sdp_number_scrubbed_in_o_and_c_lines() -> None:
    msg = message("Content-Type: application/sdp", body=SDP)
    assert make_body_safe(msg, scrub, x=X) == 2
    body = wire_body(msg)
    assert AB not in body
    assert f"o={X} 1 1".encode() in body and f"c=IN IP4 gw-{X}.example".encode() in body


def test_clean_sdp_left_as_it_came() -> None:
    clean = SDP.replace(AB, b"10000000000")
    msg = message("Content-Type: Application/SDP ; foo=bar", body=clean)
    body, before = msg.body, msg.serialize()
    assert make_body_safe(msg, scrub, x=X) == 0
    assert msg.body is body and msg.serialize() == before


def test_identity_content_encoding_is_readable() -> None:
    msg = message("Content-Type: application/sdp", "Content-Encoding: identity", body=SDP)
    assert make_body_safe(msg, scrub, x=X, unreadable="reject") == 2
    assert AB not in wire_body(msg)


# ---- unreadable whole bodies ---------------------------------------------------------------------

def test_gzip_body_stripped() -> None:
    msg = message("Content-Type: application/sdp", "Content-Encoding: gzip",
                  "Content-Disposition: session", body=gzip.compress(SDP))
    assert make_body_safe(msg, scrub, x=X) == 1
    assert removed(msg)
    assert wire_body(msg) == b""


def test_gzip_body_refused_and_left_alone() -> None:
    msg = message("Content-Type: application/sdp", "Content-Encoding: gzip",
                  body=gzip.compress(SDP))
    before = msg.serialize()
    with pytest.raises(BodyRefused, match="gzip"):
        make_body_safe(msg, scrub, x=X, unreadable="reject")
    assert msg.serialize() == before


@pytest.mark.parametrize("rows", [
    ("Content-Type: application/octet-stream",),
    ("Content-Type: application/vnd.3gpp.sms",),
    (),  # no Content-Type at all
    ("Content-Type: garbage",),
    ("Content-Type: application/sdp", "Content-Type: application/isup"),
    ("Content-Type: text/plain; charset=utf-16",),
    ("Content-Type: application/sdp", "Content-Transfer-Encoding: base64"),
    ("Content-Encoding: gzip", "Content-Type: application/sdp"),
    ("Content-Type: application/sdp", "Content-Encoding: identity, gzip"),
])
def test_unreadable_bodies_stripped_or_refused(rows: tuple[str, ...]) -> None:
    msg = message(*rows, body=SDP)
    assert make_body_safe(msg, scrub, x=X) == 1
    assert removed(msg)
    with pytest.raises(BodyRefused):
        make_body_safe(message(*rows, body=SDP), scrub, x=X, unreadable="reject")


@pytest.mark.parametrize("ctype", [
    "text/plain", "application/pidf+xml", "application/xml; charset=UTF-8", "application/json",
    "message/sipfrag", "application/dtmf-relay", "application/dtmf", "TEXT/HTML",
])
def test_readable_types_scrubbed(ctype: str) -> None:
    msg = message(f"Content-Type: {ctype}", body=b"who: " + AB + b"\r\n")
    assert make_body_safe(msg, scrub, x=X, unreadable="reject") == 1
    assert wire_body(msg) == b"who: " + XB + b"\r\n"


def test_whole_isup_body_stripped_or_rewritten() -> None:
    rows = ("Content-Type: application/isup;version=itu-t92+",
            "Content-Disposition: signal;handling=optional")
    msg = message(*rows, body=IAM_BODY)
    assert make_body_safe(msg, scrub, x=X, unreadable="reject") == 1
    assert removed(msg)
    msg = message(*rows, body=IAM_BODY)
    assert make_body_safe(msg, scrub, x=X, isup="rewrite") == 4
    body = wire_body(msg)
    assert A_BCD not in body
    assert msg.header("content-disposition") == "signal;handling=optional"
    broken = message(*rows, body=IAM_BODY[:-1])
    assert make_body_safe(broken, scrub, x=X, isup="rewrite", unreadable="reject") == 1
    assert removed(broken)


def test_unknown_policy_is_an_error() -> None:
    with pytest.raises(ValueError):
        make_body_safe(message("Content-Type: text/plain", body=b"x"), scrub, x=X, isup="keep")


# ---- multipart -----------------------------------------------------------------------------------

def test_sip_i_isup_part_stripped_sdp_scrubbed() -> None:
    msg = message(MIXED, "MIME-Version: 1.0",
                  body=multipart("unique-boundary-1", SDP_PART, ISUP_PART))
    assert make_body_safe(msg, scrub, x=X) == 2 + 1
    body = wire_body(msg)
    assert msg.header("content-type") == "multipart/mixed; boundary=unique-boundary-1"
    split = split_multipart(body, "unique-boundary-1")
    assert split is not None
    parts, _ = split
    assert parts == [SDP_PART.replace(AB, XB)]
    assert AB not in body and A_BCD not in body and IAM_BODY not in body


def test_sip_i_isup_part_rewritten() -> None:
    msg = message(MIXED, body=multipart("unique-boundary-1", SDP_PART, ISUP_PART))
    assert make_body_safe(msg, scrub, x=X, isup="rewrite") == 2 + 4
    split = split_multipart(wire_body(msg), "unique-boundary-1")
    assert split is not None
    sdp, isup = split[0]
    assert sdp == SDP_PART.replace(AB, XB)
    head, _, iam = isup.partition(b"\r\n\r\n")
    assert head + b"\r\n\r\n" == ISUP_PART[: len(head) + 4]
    assert A_BCD not in iam
    msg_isup = parse_isup(iam)
    assert msg_isup.optional is not None
    cgpn = dict(msg_isup.optional)[CALLING_PARTY_NUMBER]
    assert decode_number_param(cgpn).digits == X


def test_broken_isup_part_dropped_even_with_reject() -> None:
    broken = ISUP_PART[:-3]
    msg = message(MIXED, body=multipart("unique-boundary-1", SDP_PART, broken))
    assert make_body_safe(msg, scrub, x=X, isup="rewrite", unreadable="reject") == 2 + 1
    assert split_multipart(wire_body(msg), "unique-boundary-1") == (
        [SDP_PART.replace(AB, XB)], False)


def test_base64_part_dropped_or_refused() -> None:
    coded = (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
             + base64.b64encode(b"caller " + AB))
    body = multipart("b1", SDP_PART, coded)
    msg = message('Content-Type: multipart/mixed;boundary="b1"', body=body)
    assert make_body_safe(msg, scrub, x=X) == 2 + 1
    assert split_multipart(wire_body(msg), "b1") == ([SDP_PART.replace(AB, XB)], False)
    with pytest.raises(BodyRefused, match="part 2"):
        make_body_safe(message('Content-Type: multipart/mixed;boundary="b1"', body=body),
                       scrub, x=X, unreadable="reject")


@pytest.mark.parametrize("part", [
    b"Content-Type: application/octet-stream\r\n\r\n\x01\x02",
    b"Content-Type: text/plain\r\nContent-Encoding: gzip\r\n\r\n" + gzip.compress(AB),
    b"\r\nno headers, so no Content-Type",
    b"not a header line\r\n\r\nbody",
    b"Content-Type: text/plain\r\nContent-Type: application/isup\r\n\r\n" + IAM_BODY,
])
def test_unreadable_parts_dropped(part: bytes) -> None:
    msg = message(MIXED, body=multipart("unique-boundary-1", SDP_PART, part))
    assert make_body_safe(msg, scrub, x=X) == 3
    split = split_multipart(wire_body(msg), "unique-boundary-1")
    assert split == ([SDP_PART.replace(AB, XB)], False)


def test_number_in_part_headers_scrubbed() -> None:
    part = (f"Content-Type: application/sdp\r\nContent-ID: <{A}@gw.example>\r\n"
            f"Content-Disposition: session; filename={A}.sdp\r\n\r\n").encode() + b"v=0\r\n"
    msg = message(MIXED, body=multipart("unique-boundary-1", part))
    assert make_body_safe(msg, scrub, x=X) == 2
    body = wire_body(msg)
    assert AB not in body and f"<{X}@gw.example>".encode() in body


def test_part_content_length_follows() -> None:
    part = b"Content-Type: application/sdp\r\nContent-Length: %d\r\n\r\n" % len(SDP) + SDP
    msg = message(MIXED, body=multipart("unique-boundary-1", part))
    make_body_safe(msg, scrub, x=X)
    (new,), _ = split_multipart(wire_body(msg), "unique-boundary-1") or ([b""], False)
    head, _, content = new.partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % len(content) in head and len(content) == len(SDP) + 8


def test_nothing_left_means_no_body() -> None:
    msg = message(MIXED, "Content-Disposition: session",
                  body=multipart("unique-boundary-1", ISUP_PART))
    assert make_body_safe(msg, scrub, x=X) == 2  # the ISUP part, then the body
    assert removed(msg)


def test_clean_multipart_untouched() -> None:
    msg = message(MIXED, body=multipart("unique-boundary-1", b"Content-Type: text/plain\r\n\r\nhi"))
    body = msg.body
    assert make_body_safe(msg, scrub, x=X) == 0
    assert msg.body is body


def test_preamble_and_epilogue_dropped() -> None:
    body = multipart("unique-boundary-1", b"Content-Type: text/plain\r\n\r\nhello",
                     preamble=b"call " + AB + b"\r\n", epilogue=b"also " + AB)
    msg = message(MIXED, body=body)
    make_body_safe(msg, scrub, x=X)
    text = b"Content-Type: text/plain\r\n\r\nhello"
    assert wire_body(msg) == multipart("unique-boundary-1", text)


def test_nested_multipart_scrubbed_recursively() -> None:
    inner = multipart("in", SDP_PART, ISUP_PART)
    outer_part = b'Content-Type: multipart/alternative; boundary="in"\r\n\r\n' + inner
    msg = message("Content-Type: multipart/related; boundary=out",
                  body=multipart("out", outer_part, b"Content-Type: text/plain\r\n\r\n" + AB))
    assert make_body_safe(msg, scrub, x=X) == 2 + 1 + 1
    body = wire_body(msg)
    assert AB not in body and IAM_BODY not in body
    (nested, text), _ = split_multipart(body, "out") or ([b"", b""], False)
    assert text.endswith(XB)
    assert split_multipart(nested.partition(b"\r\n\r\n")[2], "in") == (
        [SDP_PART.replace(AB, XB)], False)


def test_nesting_is_bounded() -> None:
    body = b"Content-Type: text/plain\r\n\r\n" + AB
    for depth in range(5):
        body = (f'Content-Type: multipart/mixed; boundary="d{depth}"\r\n\r\n'.encode()
                + multipart(f"d{depth}", body))
    head, _, content = body.partition(b"\r\n\r\n")
    msg = message(head.decode(), body=content)
    make_body_safe(msg, scrub, x=X)
    assert removed(msg)


@pytest.mark.parametrize("ctype,body", [
    ("multipart/mixed", multipart("b1", SDP_PART)),  # no boundary parameter
    ("multipart/mixed; boundary=b1", multipart("b1", SDP_PART)[:-6]),  # no close delimiter
    ("multipart/mixed; boundary=b2", multipart("b1", SDP_PART)),  # wrong boundary
    ("multipart/mixed; boundary=b1", multipart("b1", SDP_PART).replace(b"\r\n", b"\n")),
    ("multipart/mixed; boundary=b1; boundary=b2", multipart("b1", SDP_PART)),
    ("multipart/mixed; boundary=" + "b" * 71, multipart("b" * 71, SDP_PART)),
])
def test_malformed_multipart_is_unreadable(ctype: str, body: bytes) -> None:
    msg = message(f"Content-Type: {ctype}", body=body)
    assert make_body_safe(msg, scrub, x=X) == 1
    assert removed(msg)


def test_line_that_only_starts_like_a_delimiter_is_content() -> None:
    part = b"Content-Type: text/plain\r\n\r\nline\r\n--b1x no\r\n--b1 \tno\r\n--b1--no"
    assert split_multipart(multipart("b1", part), "b1") == ([part], False)
    # transport padding before the CRLF still makes a delimiter (RFC 2046 §5.1.1)
    assert split_multipart(b"--b1 \t\r\none\r\n--b1\t\r\ntwo\r\n--b1-- \r\n", "b1") == (
        [b"one", b"two"], False)


def test_boundary_holding_the_number() -> None:
    boundary = f"=_{A}_x"
    msg = message(f'Content-Type: multipart/mixed; boundary="{boundary}"',
                  body=multipart(boundary, SDP_PART))
    assert make_body_safe(msg, scrub, x=X) == 2 + 1
    body = wire_body(msg)
    assert AB not in body and AB not in msg.serialize()
    ctype = parse_content_type(msg.header("content-type") or "")
    assert ctype is not None
    assert split_multipart(body, ctype[1]["boundary"]) == ([SDP_PART.replace(AB, XB)], False)


def test_content_type_parser() -> None:
    assert parse_content_type('Multipart/Mixed ; Boundary="a \\"b\\";c" ; x=1;') == (
        "multipart/mixed", {"boundary": 'a "b";c', "x": "1"})
    assert parse_content_type("multipart/mixed;boundary==_Part_1") == (
        "multipart/mixed", {"boundary": "=_Part_1"})
    for bad in ("", "sdp", "a/b; c", "a/b; c=", 'a/b; c="open', "a/b junk"):
        assert parse_content_type(bad) is None


# ---- nothing hostile gets through ------------------------------------------------------------

_pieces = st.sampled_from([
    b"--b1", b"--b1--", b"\r\n", b"\r\n\r\n", b"Content-Type: text/plain", b"Content-Type: ",
    b"multipart/mixed; boundary=b1", b"application/isup", b"\r\n ", AB, IAM_BODY[:9], b" ",
    b"Content-Transfer-Encoding: base64", b"Content-Length: 3", b":", b"\x00\xff",
])


@settings(max_examples=400)
@given(st.lists(_pieces, max_size=30).map(b"".join), st.sampled_from(["strip", "rewrite"]))
def test_hostile_multipart_never_leaks_or_crashes(body: bytes, isup: str) -> None:
    msg = message("Content-Type: multipart/mixed; boundary=b1", body=body)
    try:
        make_body_safe(msg, scrub, x=X, isup=isup, unreadable="reject")
    except BodyRefused:
        pass
    msg = message("Content-Type: multipart/mixed; boundary=b1", body=body)
    make_body_safe(msg, scrub, x=X, isup=isup)
    out = wire_body(msg)
    assert AB not in out and A_BCD not in out
