"""Property tests: generated messages round-trip; mutated messages only ever raise ParseError;
the one-regex fast paths agree with the general parsers on any input."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.sip.address import (
    _parse_name_addr_general,
    _parse_params_general,
    _parse_via_general,
    parse_name_addr,
    parse_params,
    parse_via,
)
from proxy.sip.errors import ParseError
from proxy.sip.message import SipMessage, StreamFramer, build_response, parse_datagram
from proxy.sip.uri import SipUri, _parse_uri_general, parse_uri

CORPUS = Path(__file__).resolve().parent.parent / "data" / "rfc4475"
TYPICAL_INVITE = (
    b"INVITE sip:700100000000001@10.0.0.1:5060;user=phone SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.1.2.3:5060;branch=z9hG4bK-524287-1---2f1a3b4c5d6e7f80;rport\r\n"
    b"Via: SIP/2.0/UDP 10.9.8.7:5060;received=10.9.8.7;branch=z9hG4bK776asdhds\r\n"
    b"Max-Forwards: 69\r\n"
    b"From: \"13800000001\" <sip:13800000001@10.1.2.3;user=phone>;tag=1928301774\r\n"
    b"To: <sip:700100000000001@10.0.0.1;user=phone>\r\n"
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:13800000001@10.1.2.3:5060;transport=udp>\r\n"
    b"P-Asserted-Identity: \"Bell, A\" <sip:13800000001@10.1.2.3>, <tel:+8613800000001>\r\n"
    b"Record-Route: <sip:[2001:db8::1]:5070;lr>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 26\r\n"
    b"\r\n"
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4"
)
SEEDS = [p.read_bytes() for p in sorted(CORPUS.glob("*.dat"))] + [TYPICAL_INVITE]
FAST = settings(max_examples=100, deadline=timedelta(seconds=2),
                suppress_health_check=[HealthCheck.too_slow])

# ---- generating well-formed messages -----------------------------------------------------------
TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
USER_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()&=+$,;?/"
PARAM_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()[]/:&+$"
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=10)
alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
hosts = st.one_of(
    st.lists(alnum, min_size=1, max_size=4).map(".".join),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
    st.integers(1, 0xFFFF).map(lambda n: f"[2001:db8::{n:x}]"),
)
escapes = st.integers(0, 255).map(lambda b: f"%{b:02X}")
users = st.lists(st.one_of(st.text(USER_CHARS, min_size=1, max_size=6), escapes),
                 min_size=1, max_size=4).map("".join)
ports = st.one_of(st.none(), st.integers(1, 65535))
uri_params = st.lists(
    st.tuples(st.text(PARAM_CHARS, min_size=1, max_size=6),
              st.one_of(st.none(), st.text(PARAM_CHARS, max_size=6))),
    max_size=3).map(lambda ps: "".join(f";{k}" if v is None else f";{k}={v}" for k, v in ps))


@st.composite
def sip_uris(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["sip", "sips"]))
    user = draw(st.one_of(st.none(), users))
    host, port = draw(hosts), draw(ports)
    return (f"{scheme}:{'' if user is None else user + '@'}{host}"
            f"{'' if port is None else f':{port}'}{draw(uri_params)}")


quoted_chars = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
displays = st.one_of(
    st.none(),
    st.lists(tokens, min_size=1, max_size=3).map(" ".join),
    st.text(quoted_chars, max_size=12).map(
        lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.text("张三李四王五", min_size=1, max_size=4).map(
        lambda t: '"' + t.encode("utf-8").decode("latin-1") + '"'),
)
header_params = st.lists(st.tuples(tokens, st.one_of(st.none(), tokens)), max_size=3).map(
    lambda ps: "".join(f";{k}" if v is None else f";{k}={v}" for k, v in ps))


@dataclass
class Generated:
    data: bytes
    method: str
    uri: str
    from_display: str | None
    from_uri: str
    from_tag: str
    to_uri: str
    via_hosts: list[str]
    branches: list[str]
    call_id: str
    cseq: int
    max_forwards: int
    extra: dict[str, str]
    body: bytes


def name(draw: st.DrawFn, long: str, compact: str | None = None) -> str:
    if compact and draw(st.booleans()):
        return compact
    return draw(st.sampled_from([long, long.lower(), long.upper()]))


def maybe_fold(draw: st.DrawFn, value: str) -> str:
    """Turn one space of the value into a line fold (RFC 3261 §7.3.1)."""
    spaces = [i for i, c in enumerate(value) if c == " "]
    if not spaces or not draw(st.booleans()):
        return value
    i = draw(st.sampled_from(spaces))
    return value[:i] + draw(st.sampled_from(["\r\n ", "\r\n\t", "\r\n   "])) + value[i + 1:]


@st.composite
def messages(draw: st.DrawFn) -> Generated:
    method = draw(st.sampled_from(["INVITE", "OPTIONS", "BYE", "MESSAGE", "REGISTER", "X-FOO"]))
    uri = draw(sip_uris())
    display, from_uri, tag = draw(displays), draw(sip_uris()), draw(tokens)
    to_uri = draw(sip_uris())
    vias = draw(st.lists(st.tuples(st.sampled_from(["UDP", "TCP", "TLS", "SCTP", "ws"]), hosts,
                                   ports, tokens), min_size=1, max_size=3))
    call_id = draw(st.text(TOKEN_CHARS + "@()<>:\\/[]?{}", min_size=1, max_size=20))
    cseq = draw(st.integers(0, 2**32 - 1))
    max_forwards = draw(st.integers(0, 255))
    extra = draw(st.dictionaries(st.text("abcdefghij", min_size=1, max_size=6).map(
        lambda n: "X-" + n), st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                                     min_size=1, max_size=20), max_size=3))
    body = draw(st.binary(max_size=60))
    via_rows: list[str] = []
    for transport, host, port, branch in vias:
        value = (f"SIP/2.0/{transport} {host}{'' if port is None else f':{port}'}"
                 f";branch=z9hG4bK{branch}")
        via_rows.append(f"{name(draw, 'Via', 'v')}: {maybe_fold(draw, value)}")
    rows: list[str] = []
    from_value = f"{'' if display is None else display + ' '}<{from_uri}>;tag={tag}"
    rows.append(f"{name(draw, 'From', 'f')}:{draw(st.sampled_from([' ', '', '   ']))}"
                f"{from_value}")
    rows.append(f"{name(draw, 'To', 't')}: <{to_uri}>{draw(header_params)}")
    rows.append(f"{name(draw, 'Call-ID', 'i')}: {call_id}")
    rows.append(f"{name(draw, 'CSeq')}: {maybe_fold(draw, f'{cseq} {method}')}")
    rows.append(f"{name(draw, 'Max-Forwards')}: {max_forwards}")
    rows.extend(f"{k}: {maybe_fold(draw, v)}" for k, v in extra.items())
    rows = draw(st.permutations(rows))
    at = draw(st.integers(0, len(rows)))
    rows[at:at] = via_rows  # Via rows keep their order
    rows.append(f"{name(draw, 'Content-Length', 'l')}: {len(body)}")
    head = f"{method} {uri} SIP/2.0\r\n" + "".join(r + "\r\n" for r in rows) + "\r\n"
    return Generated(head.encode("latin-1") + body, method, uri, display, from_uri, tag, to_uri,
                     [h for _, h, _, _ in vias], [f"z9hG4bK{b}" for _, _, _, b in vias],
                     call_id, cseq, max_forwards, extra, body)


@FAST
@given(messages())
def test_generated_messages_parse_and_round_trip(gen: Generated) -> None:
    msg = parse_datagram(gen.data)
    assert msg is not None
    msg.validate()
    assert msg.method == gen.method
    assert str(msg.uri) == gen.uri
    assert msg.from_.display == gen.from_display
    assert str(msg.from_.uri) == gen.from_uri
    assert msg.from_.tag == gen.from_tag
    assert str(msg.to.uri) == gen.to_uri
    assert [v.host for v in msg.vias] == gen.via_hosts
    assert [v.branch for v in msg.vias] == gen.branches
    assert msg.call_id == gen.call_id
    assert msg.cseq == (gen.cseq, gen.method)
    assert msg.max_forwards == gen.max_forwards
    for key, value in gen.extra.items():
        assert msg.header(key) == value
    assert msg.body == gen.body
    assert msg.serialize() == gen.data
    # the same bytes over a stream, in two reads
    framer = StreamFramer()
    half = len(gen.data) // 2
    (framed,) = framer.feed(gen.data[:half]) + framer.feed(gen.data[half:])
    assert isinstance(framed, SipMessage) and framed.serialize() == gen.data


@FAST
@given(messages(), st.data())
def test_edits_keep_the_message_parseable(gen: Generated, data: st.DataObject) -> None:
    msg = parse_datagram(gen.data)
    assert msg is not None
    untouched = [r for r in msg.rows if r[0] not in ("via", "from", "max-forwards",
                                                     "content-length")]
    new_user = data.draw(users)
    f = msg.from_
    assert isinstance(f.uri, SipUri)
    msg.set_header("from", str(f.replace(uri=f.uri.with_user(new_user), display=None)))
    msg.push_via("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-ours")
    msg.set_header("max-forwards", str(max(gen.max_forwards - 1, 0)))
    msg.prepend_record_route("<sip:10.0.0.1;lr>")
    msg.set_body(data.draw(st.binary(max_size=30)))
    again = parse_datagram(msg.serialize())
    assert again is not None
    again.validate()
    assert again.from_.uri.user == new_user and again.from_.tag == gen.from_tag
    assert again.top_via.branch == "z9hG4bK-ours"
    assert [v.branch for v in again.vias[1:]] == gen.branches
    assert again.body == msg.body
    assert [r for r in again.rows if r[0] not in ("via", "from", "max-forwards", "content-length",
                                                 "record-route")] == untouched
    assert again.pop_via() == "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-ours"


# ---- mutations only ever raise ParseError ------------------------------------------------------
INTERESTING = [b"\r\n", b"\r\n ", b"\n", b"\r", b"%00", b"%", b"\xb2", b"[", b"]", b"<", b">",
               b"\"", b"\\", b";", b",", b"=", b"@", b":", b"\x00", b"\xff", b" ", b"\t",
               b"4294967296", b"SIP/2.0", b"sips:", b"tel:", b"z9hG4bK", b"l: 5\r\n"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice", "dup",
                                   "huge"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            i = min(pos, len(data) - 1)
            data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
        elif op == "insert":
            ins = draw(st.one_of(st.sampled_from(INTERESTING), st.binary(min_size=1, max_size=4)))
            data = data[:pos] + ins + data[pos:]
        elif op == "delete":
            data = data[:pos] + data[pos + draw(st.integers(1, 8)):]
        elif op == "truncate":
            data = data[:pos]
        elif op == "splice":
            other = draw(st.sampled_from(SEEDS))
            data = data[:pos] + other[draw(st.integers(0, len(other))):]
        elif op == "dup":
            lines = data.split(b"\r\n")
            if len(lines) > 2:
                i = draw(st.integers(1, len(lines) - 1))
                lines.insert(i, lines[i])
                data = b"\r\n".join(lines)
        else:
            run = draw(st.sampled_from([b"a", b"9", b";", b"%", b",", b"\""]))
            data = data[:pos] + run * draw(st.sampled_from([500, 5000, 40000])) + data[pos:]
    return data


def read_everything(msg: SipMessage) -> None:
    readers = [lambda: msg.uri, lambda: msg.from_, lambda: msg.to, lambda: msg.call_id,
               lambda: msg.cseq, lambda: msg.top_via, lambda: msg.vias,
               lambda: msg.max_forwards, lambda: msg.content_length, msg.validate]
    readers += [lambda n=n: msg.name_addrs(n)
                for n in ("contact", "route", "record-route", "p-asserted-identity")]
    for read in readers:
        try:
            read()
        except ParseError:
            pass
    for n, _ in msg.rows:
        msg.header_values(n)
    for via in _or_empty(lambda: msg.vias):
        via.branch, via.received, via.rport, via.maddr, via.has_magic_cookie  # noqa: B018
        via.response_address(("192.0.2.1", 5060))
    for na in _or_empty(lambda: msg.name_addrs("contact")):
        str(na)
        na.tag, na.display_text  # noqa: B018
    msg.serialize()


def _or_empty(fn):  # type: ignore[no-untyped-def]
    try:
        return fn()
    except ParseError:
        return []


@settings(max_examples=300, deadline=timedelta(seconds=2),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_mutated_messages_only_raise_parse_error(data: bytes) -> None:
    try:
        msg = parse_datagram(data)
    except ParseError as exc:
        assert exc.status in (400, 501, 505)
        if exc.can_respond:
            assert exc.message is not None
            response = build_response(exc.message, exc.status, "Bad Request", to_tag="x")
            assert parse_datagram(response.serialize()) is not None
        return
    if msg is None:
        return
    read_everything(msg)
    again = parse_datagram(msg.serialize())
    assert again is not None
    assert again.rows[: len(msg.rows)] == msg.rows or not any(
        n == "content-length" for n, _ in msg.rows)


@settings(max_examples=100, deadline=timedelta(seconds=2),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(mutated(), min_size=1, max_size=3), st.integers(1, 300))
def test_stream_framing_never_depends_on_chunking(parts: list[bytes], step: int) -> None:
    stream = b"".join(parts)

    def verdicts(items: list[SipMessage | ParseError]) -> list[object]:
        return [str(i) if isinstance(i, ParseError) else i.serialize() for i in items]

    whole = StreamFramer()
    expected = verdicts(whole.feed(stream))
    chunked = StreamFramer()
    got: list[SipMessage | ParseError] = []
    for i in range(0, len(stream), step):
        got.extend(chunked.feed(stream[i:i + step]))
    assert verdicts(got) == expected
    assert chunked.broken == whole.broken


# ---- fast paths agree with the general parsers -------------------------------------------------
FRAGMENT_ALPHABET = 'sip:tel<>@;=,"\\ \t%0A9aZ.-_[]/?&+$~*!\'()\x00\xe9'
fragments = st.text(FRAGMENT_ALPHABET, max_size=30)


def outcome(parse, text: str):  # type: ignore[no-untyped-def]
    try:
        return parse(text)
    except ParseError:
        return ParseError


def same_name_addr(a: object, b: object) -> bool:
    if a is ParseError or b is ParseError:
        return a is b
    return (a.display, str(a.uri), a.raw_params, a.params, str(a)) == (  # type: ignore[attr-defined]
        b.display, str(b.uri), b.raw_params, b.params, str(b))  # type: ignore[attr-defined]


name_addr_texts = st.one_of(
    fragments,
    st.builds(lambda d, u, p: f"{'' if d is None else d + ' '}<{u}>{p}", displays, sip_uris(),
              header_params),
    st.builds(lambda u, p, f: u + p + f, sip_uris(), header_params, fragments),
    st.builds(lambda d, u, f, p: f"{d or ''}<{u}{f}>{p}", displays, sip_uris(), fragments,
              header_params),
)


@settings(max_examples=250, deadline=timedelta(seconds=2))
@given(name_addr_texts)
def test_name_addr_fast_path_agrees(text: str) -> None:
    fast = outcome(parse_name_addr, text)
    general = outcome(lambda t: _parse_name_addr_general(t.strip(" \t"), "x"), text)
    assert same_name_addr(fast, general)


via_texts = st.one_of(
    fragments.map(lambda f: "SIP/2.0/UDP " + f),
    st.builds(lambda h, p, ps, f: f"SIP/2.0/UDP {h}{'' if p is None else f':{p}'}{ps}{f}",
              hosts, st.one_of(ports, st.integers(0, 999999)), header_params,
              st.sampled_from(["", "", " ", ";", "x", ";a=\"q\"", ";received=[::1]"])),
)


@settings(max_examples=300, deadline=timedelta(seconds=2))
@given(via_texts)
def test_via_fast_path_agrees(text: str) -> None:
    fast = outcome(parse_via, text)
    general = outcome(lambda t: _parse_via_general(t.strip(" \t")), text)
    if fast is ParseError or general is ParseError:
        assert fast is general
        return
    assert (fast.protocol, fast.transport, fast.host, fast.port, fast.params, str(fast)) == (
        general.protocol, general.transport, general.host, general.port, general.params,
        str(general))


@settings(max_examples=300, deadline=timedelta(seconds=2))
@given(st.one_of(sip_uris(), fragments.map(lambda f: "sip:" + f),
                 st.builds(lambda u, f: u + f, sip_uris(), fragments)))
def test_uri_fast_path_agrees(text: str) -> None:
    fast, general = outcome(parse_uri, text), outcome(_parse_uri_general, text)
    if fast is ParseError or general is ParseError:
        assert fast is general
        return
    assert str(fast) == str(general)
    assert (fast.user, fast.host, fast.port, fast.params) == (
        general.user, general.host, general.port, general.params)


@settings(max_examples=300, deadline=timedelta(seconds=2))
@given(st.one_of(header_params, fragments.map(lambda f: ";" + f)))
def test_params_fast_path_agrees(text: str) -> None:
    assert outcome(lambda t: parse_params(t, "x"), text) == outcome(
        lambda t: _parse_params_general(t, "x"), text)


def test_an_empty_parameter_is_refused_by_every_path() -> None:
    """Found by the property above on Debian's Python 3.11.2, whose sre let a possessive
    repeat of a group (`(...)*+`) end inside an iteration: the fast regexes took `<sip:0;>`."""
    for text in ("<sip:0;>", "<sip:a@h;x;>;t", "sip:h;"):
        for parse in (lambda t: parse_name_addr(t, "x"),
                      lambda t: _parse_name_addr_general(t.strip(" \t"), "x")):
            with pytest.raises(ParseError):
                parse(text)
    with pytest.raises(ParseError):
        parse_uri("sip:0;")
