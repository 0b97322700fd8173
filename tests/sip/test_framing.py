"""StreamFramer: cutting SIP messages out of a TCP byte stream (RFC 3261 §18.3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.sip.errors import ParseError
from proxy.sip.message import SipMessage, StreamFramer

CORPUS = Path(__file__).resolve().parent.parent / "data" / "rfc4475"


def request(n: int, body: bytes = b"hello") -> bytes:
    return (b"MESSAGE sip:b@h SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK%d\r\n"
            b"From: <sip:a@h>;tag=1\r\nTo: <sip:b@h>\r\nCall-ID: c%d\r\nCSeq: %d MESSAGE\r\n"
            b"Content-Length: %d\r\n\r\n" % (n, n, n, len(body))) + body


def messages(items: list[SipMessage | ParseError]) -> list[SipMessage]:
    assert all(isinstance(i, SipMessage) for i in items), items
    return [i for i in items if isinstance(i, SipMessage)]


def feed_in_steps(framer: StreamFramer, data: bytes, step: int) -> list[SipMessage | ParseError]:
    out: list[SipMessage | ParseError] = []
    for i in range(0, len(data), step):
        out.extend(framer.feed(data[i:i + step]))
    return out


def test_one_message_one_read() -> None:
    framer = StreamFramer()
    (msg,) = messages(framer.feed(request(1)))
    assert msg.body == b"hello" and msg.call_id == "c1"
    assert framer.feed(b"") == []
    assert not framer.broken


@pytest.mark.parametrize("step", [1, 2, 3, 5, 17, 64, 1000])
def test_split_across_reads(step: int) -> None:
    stream = request(1) + request(2, b"") + request(3, b"\r\n\r\nbody with blank lines\r\n")
    got = messages(feed_in_steps(StreamFramer(), stream, step))
    assert [m.call_id for m in got] == ["c1", "c2", "c3"]
    assert [m.body for m in got] == [b"hello", b"", b"\r\n\r\nbody with blank lines\r\n"]


def test_several_messages_in_one_read_and_keepalives() -> None:
    stream = b"\r\n\r\n" + request(1) + b"\r\n" + request(2) + b"\r\n\r\n" + request(3) + b"\r\n"
    framer = StreamFramer()
    got = messages(framer.feed(stream))
    assert [m.call_id for m in got] == ["c1", "c2", "c3"]
    assert framer.feed(b"\r\n") == []  # a pong between messages
    assert [m.call_id for m in messages(framer.feed(request(4)))] == ["c4"]


def test_bytes_are_kept_exactly() -> None:
    wire = request(7, b"\x00\x01\r\n\xff")
    (msg,) = messages(feed_in_steps(StreamFramer(), wire, 3))
    assert msg.serialize() == wire


def test_compact_and_folded_content_length() -> None:
    compact = request(1).replace(b"Content-Length: 5", b"l: 5")
    folded = request(2).replace(b"Content-Length: 5", b"CONTENT-LENGTH  :\r\n   5")
    got = messages(StreamFramer().feed(compact + folded))
    assert [m.body for m in got] == [b"hello", b"hello"]


@pytest.mark.parametrize("bad", [
    b"", b"Content-Length: -5\r\n", b"Content-Length: five\r\n", b"Content-Length: 5\r\nl: 5\r\n",
    b"Content-Length: 1234567890\r\n", b"Content-Length: 5\r\n 1\r\n",
])
def test_missing_or_bad_content_length_breaks_the_stream(bad: bytes) -> None:
    message = request(1).replace(b"Content-Length: 5\r\n", bad)
    framer = StreamFramer()
    (error,) = framer.feed(message + request(2))
    assert isinstance(error, ParseError)
    assert framer.broken
    # what could be read is attached, so the request can be answered before closing
    assert error.message is not None and error.message.call_id == "c1"
    assert error.can_respond
    assert framer.feed(request(3)) == []  # nothing more once broken


def test_oversize_message_is_an_error() -> None:
    framer = StreamFramer(max_message_bytes=300)
    (error,) = framer.feed(request(1, b"x" * 400))
    assert isinstance(error, ParseError) and "size limit" in error.reason
    assert framer.broken


def test_oversize_header_block_is_an_error_before_it_ends() -> None:
    framer = StreamFramer(max_message_bytes=300)
    assert framer.feed(b"INVITE sip:a@h SIP/2.0\r\nX: " + b"a" * 200) == []
    (error,) = framer.feed(b"a" * 200)
    assert isinstance(error, ParseError) and "header block" in error.reason
    assert framer.broken


def test_same_verdict_whatever_the_chunking() -> None:
    huge_head = b"INVITE sip:a@h SIP/2.0\r\nX: " + b"a" * 500 + b"\r\nl: 0\r\n\r\n"
    verdicts = set()
    for step in (1, 7, 10_000):
        framer = StreamFramer(max_message_bytes=300)
        out = feed_in_steps(framer, huge_head, step)
        verdicts.add(tuple(str(i) for i in out))
        assert framer.broken
    assert len(verdicts) == 1


def test_a_bad_message_inside_a_sound_stream() -> None:
    bad = request(2).replace(b"CSeq: 2 MESSAGE", b"CSeq: 2 MES\nSAGE")
    got = StreamFramer().feed(request(1) + bad + request(3))
    assert isinstance(got[0], SipMessage) and isinstance(got[2], SipMessage)
    assert isinstance(got[1], ParseError)


def test_byte_by_byte_stays_linear() -> None:
    # 60 KB header block fed a byte at a time: the resumed search keeps this fast
    data = b"OPTIONS sip:a@h SIP/2.0\r\n" + b"X: " + b"a" * 60_000 + b"\r\nl: 0\r\n\r\n"
    framer = StreamFramer()
    got: list[SipMessage | ParseError] = []
    for i in range(len(data)):
        got.extend(framer.feed(data[i:i + 1]))
    (msg,) = messages(got)
    assert len(msg.header("x") or "") == 60_000


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.dat")), ids=lambda p: p.stem)
def test_corpus_over_a_stream_never_raises(path: Path) -> None:
    data = path.read_bytes()
    whole = StreamFramer()
    verdict = [str(i) if isinstance(i, ParseError) else i.serialize() for i in whole.feed(data)]
    chunked = StreamFramer()
    got = feed_in_steps(chunked, data, 13)
    assert [str(i) if isinstance(i, ParseError) else i.serialize() for i in got] == verdict
    assert chunked.broken == whole.broken
