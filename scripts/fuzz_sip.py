#!/usr/bin/env python3
"""Long-run fuzzer for the sans-IO SIP message layer.

Feeds mutated datagrams (bit flips, byte inserts/deletes, splices between messages, truncations,
duplicated or folded header rows, huge values, odd octets) built from the RFC 4475 corpus and a
few typical carrier messages to parse_datagram + validate + every accessor + the edits +
serialize, and the same bytes as TCP streams cut into random chunks to the StreamFramer.

A *finding* is any exception other than ParseError, a case slower than --slow seconds, a
serialised message that no longer parses the same way, a one-regex fast path that disagrees with
its general parser, or a StreamFramer whose output depends on how the stream was chunked.
Findings are printed and saved (input + traceback) under --out.

Usage: python3 scripts/fuzz_sip.py --cases 1000000 [--seed N] [--out DIR] [--slow 1.0]
(--out defaults to $TMPDIR/sip-fuzz-findings)
Exit status: 0 when nothing was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# the general parsers behind the one-regex fast paths, to check that both agree
from proxy.sip.address import (
    _parse_name_addr_general,
    _parse_via_general,
    parse_name_addr,
    parse_via,
)
from proxy.sip.errors import ParseError
from proxy.sip.message import (
    SipMessage,
    StreamFramer,
    build_response,
    parse_datagram,
    parse_message,
)
from proxy.sip.uri import _parse_uri_general, parse_uri

CORPUS_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "rfc4475"

TYPICAL = [
    b"INVITE sip:700100000000001@10.0.0.1:5060;user=phone SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.1.2.3:5060;branch=z9hG4bK-524287-1---2f1a3b4c5d6e7f80;rport\r\n"
    b"Via: SIP/2.0/UDP 10.9.8.7:5060;received=10.9.8.7;branch=z9hG4bK776asdhds\r\n"
    b"Max-Forwards: 69\r\n"
    b"From: \"13800000001\" <sip:13800000001@10.1.2.3;user=phone>;tag=1928301774\r\n"
    b"To: <sip:700100000000001@10.0.0.1;user=phone>\r\n"
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:13800000001@10.1.2.3:5060;transport=udp>\r\n"
    b"P-Asserted-Identity: \"Alice\" <sip:13800000001@10.1.2.3;user=phone>,"
    b" <tel:+8613800000001>\r\n"
    b"Record-Route: <sip:10.9.8.7;lr>, <sip:[2001:db8::1]:5070;lr;transport=tcp>\r\n"
    b"Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, PRACK, UPDATE, INFO, REFER\r\n"
    b"Supported: 100rel, timer, replaces\r\n"
    b"Date: Sat, 13 Nov 2010 23:29:00 GMT\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 129\r\n"
    b"\r\n"
    b"v=0\r\n"
    b"o=13800000001 2890844526 2890844526 IN IP4 10.1.2.3\r\n"
    b"s=-\r\n"
    b"c=IN IP4 10.1.2.3\r\n"
    b"t=0 0\r\n"
    b"m=audio 49170 RTP/AVP 8 0 101\r\n"
    b"a=sendrecv\r\n",
    b"SIP/2.0 180 Ringing\r\n"
    b"v: SIP/2.0/TCP [2001:db8::9]:5060;branch=z9hG4bKabc;received=[2001:db8::9];rport=5060\r\n"
    b"f: <sips:alice:secret@example.com:5061;transport=tls?subject=x%20y>;tag=a1\r\n"
    b"t: Bob <tel:+86-10-1234-5678;phone-context=+86>;tag=b2\r\n"
    b"i: 1234@host\r\n"
    b"CSeq: 7 INVITE\r\n"
    b"WWW-Authenticate: Digest realm=\"a,b\", nonce=\"x\"\r\n"
    b"l: 0\r\n"
    b"\r\n",
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP h.example.com:5060;branch=z9hG4bK1;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: sip:u@example.com\r\n"
    b"From: sip:u@example.com;tag=9\r\n"
    b"Call-ID: r1\r\n"
    b"CSeq: 1 REGISTER\r\n"
    b"Contact: *\r\n"
    b"Expires: 0\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n",
]

INTERESTING_BYTES = b"\r\n\x00\t :;,<>\"@%?=[]/\\\xb2\xff0123456789"
INTERESTING_TOKENS = [
    b"\r\n", b"\r\n ", b"\n", b"\r", b"%00", b"%", b"%4", b"\xb2", b"\xb9", b"[::1]", b"[",
    b"]", b"sips:", b"tel:", b"sip:", b"<", b">", b"\"", b"\\", b"\\\"", b";", b";;", b",",
    b",,", b"=", b"@", b":", b"::", b":0", b":65536", b":99999", b"4294967296", b"-1",
    b"SIP/2.0", b"SIP/3.0", b"z9hG4bK", b";branch=", b";tag=", b"\x85", b"\xa0", b"\x1c",
    b"Content-Length: 5\r\n", b"l: 99999\r\n", b"Via: SIP/2.0/UDP x\r\n", b"\r\n\r\n",
]
HUGE_CHARS = [b"a", b"9", b";", b",", b"%", b"\"", b" ", b"\\", b"<", b"@", b"\xff", b"a;"]


# ---- mutations -------------------------------------------------------------------------------
def _pos(rng: random.Random, data: bytes) -> int:
    return rng.randrange(len(data) + 1)


def bit_flip(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    if not data:
        return data
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def byte_insert(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    i = _pos(rng, data)
    if rng.random() < 0.5:
        ins = bytes([rng.choice(INTERESTING_BYTES)])
    elif rng.random() < 0.7:
        ins = rng.choice(INTERESTING_TOKENS)
    else:
        ins = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return data[:i] + ins + data[i:]


def byte_delete(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    if not data:
        return data
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.randint(1, 16):]


def byte_replace(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    if not data:
        return data
    i = rng.randrange(len(data))
    return data[:i] + bytes([rng.choice(INTERESTING_BYTES)]) + data[i + 1:]


def splice(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    other = rng.choice(corpus)
    return data[:_pos(rng, data)] + other[_pos(rng, other):]


def truncate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    return data[:_pos(rng, data)]


def _lines(data: bytes) -> tuple[list[bytes], bytes]:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data.split(b"\r\n"), b""
    return data[:end].split(b"\r\n"), data[end:]


def duplicate_row(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    lines, rest = _lines(data)
    if len(lines) < 2:
        return data
    i = rng.randrange(1, len(lines))
    lines.insert(rng.randrange(1, len(lines) + 1), lines[i])
    return b"\r\n".join(lines) + rest


def drop_row(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    lines, rest = _lines(data)
    if len(lines) < 2:
        return data
    del lines[rng.randrange(1, len(lines))]
    return b"\r\n".join(lines) + rest


def swap_rows(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    lines, rest = _lines(data)
    if len(lines) < 3:
        return data
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    lines[i], lines[j] = lines[j], lines[i]
    return b"\r\n".join(lines) + rest


def fold_row(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    spaces = [i for i, c in enumerate(data) if c == 32]
    if not spaces:
        return data
    i = rng.choice(spaces)
    return data[:i] + rng.choice([b"\r\n ", b"\r\n\t", b"\r\n  ", b"\r\n"]) + data[i + 1:]


def huge_value(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    i = _pos(rng, data)
    run = rng.choice(HUGE_CHARS) * rng.choice([100, 1000, 5000, 20000, 70000])
    return data[:i] + run + data[i:]


def crlf_to_lf(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    return data.replace(b"\r\n", b"\n", rng.randint(1, 3))


def number_swap(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    digits = [i for i, c in enumerate(data) if 48 <= c <= 57]
    if not digits:
        return data
    i = rng.choice(digits)
    j = i
    while j < len(data) and 48 <= data[j] <= 57:
        j += 1
    big = rng.choice([b"0", b"00000", b"65536", b"4294967295", b"4294967296", b"9" * 30,
                      b"-1", b"\xb2", b"1" * 5000])
    return data[:i] + big + data[j:]


MUTATORS: list[Callable[[random.Random, bytes, list[bytes]], bytes]] = [
    bit_flip, byte_insert, byte_insert, byte_delete, byte_replace, splice, truncate,
    duplicate_row, drop_row, swap_rows, fold_row, huge_value, crlf_to_lf, number_swap,
]


def mutate(rng: random.Random, corpus: list[bytes]) -> bytes:
    data = rng.choice(corpus)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 5))):
        data = rng.choice(MUTATORS)(rng, data, corpus)
    return data


# ---- what runs on each case -------------------------------------------------------------------
class Mismatch(AssertionError):
    """An invariant that does not hold (round trip, chunking independence)."""


def _quiet(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except ParseError:
        return None


def _read_everything(msg: SipMessage) -> None:
    """Every accessor a proxy may use; each may only raise ParseError."""
    _quiet(msg.validate)
    for get in (lambda: msg.uri, lambda: msg.from_, lambda: msg.to, lambda: msg.call_id,
                lambda: msg.cseq, lambda: msg.top_via, lambda: msg.vias,
                lambda: msg.max_forwards, lambda: msg.content_length):
        _quiet(get)
    uri = _quiet(lambda: msg.uri)
    if uri is not None:
        str(uri)
        uri.param("transport")
        if hasattr(uri, "user_unescaped"):
            uri.user_unescaped  # noqa: B018
            uri.hostport  # noqa: B018
            uri.with_user("700100000000001")
            uri.without_param("lr")
    for name in {n for n, _ in msg.rows}:
        msg.header(name)
        msg.header_values(name)
        msg.count(name)
    for name in ("from", "to", "contact", "route", "record-route", "p-asserted-identity"):
        for na in _quiet(lambda n=name: msg.name_addrs(n)) or []:
            str(na)
            na.tag  # noqa: B018
            na.display_text  # noqa: B018
            str(na.with_tag("x1"))
            str(na.replace(display=None))
            str(na.uri)
    for via in _quiet(lambda: msg.vias) or []:
        str(via)
        via.branch  # noqa: B018
        via.received  # noqa: B018
        via.rport  # noqa: B018
        via.maddr  # noqa: B018
        via.has_magic_cookie  # noqa: B018
        via.response_address(("192.0.2.1", 5060))


def _outcome(parse: Callable[[str], object], text: str) -> object:
    try:
        return str(parse(text)), repr(getattr(parse(text), "params", None))
    except ParseError:
        return ParseError


def _check_fast_paths(msg: SipMessage) -> None:
    """The one-regex fast paths must accept and split exactly as the general parsers do."""
    pairs: list[tuple[Callable[[str], object], Callable[[str], object], str]] = []
    for name in ("from", "to", "contact", "route", "record-route", "p-asserted-identity"):
        for value in msg.header_values(name):
            pairs.append((parse_name_addr,
                          lambda v: _parse_name_addr_general(v.strip(" \t"), "x"), value))
    for value in msg.header_values("via"):
        pairs.append((parse_via, lambda v: _parse_via_general(v.strip(" \t")), value))
    if msg.is_request:
        pairs.append((parse_uri, _parse_uri_general, msg.uri_text))
    for fast, general, value in pairs:
        if _outcome(fast, value) != _outcome(general, value):
            raise Mismatch(f"fast and general parsers disagree on {value[:80]!r}")


def _check_round_trip(msg: SipMessage) -> None:
    """serialize ∘ parse is stable: the output parses to the same rows, start line and body."""
    wire = msg.serialize()
    again = parse_message(wire)
    if again.start_line != msg.start_line or again.body != msg.body:
        raise Mismatch("start line or body changed in a round trip")
    if [r for r in again.rows if r[0] != "content-length"] != [
        r for r in msg.rows if r[0] != "content-length"
    ]:
        raise Mismatch("header rows changed in a round trip")
    if again.serialize() != wire:
        raise Mismatch("serialize is not idempotent")


def _edit(msg: SipMessage) -> None:
    """The proxy's edits on a copy; each output must parse again."""
    out = msg.copy()
    _quiet(out.pop_via)
    out.push_via("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-fuzz")
    out.prepend_record_route("<sip:10.0.0.1;lr>")
    out.set_header("max-forwards", "69")
    out.set_header_values("p-asserted-identity", ["<sip:700100000000001@10.0.0.1>"])
    out.remove_header("identity")
    out.insert_header("x-fuzz", "1", 1)
    try:
        f = out.from_
        out.set_header("from", str(f.replace(uri=f.uri.with_user("7001"), display=None)))
    except (ParseError, AttributeError):
        pass  # AttributeError: a non-SIP From URI has no with_user
    if msg.is_request:
        _quiet(lambda: out.set_uri("sip:700100000000001@10.0.0.2"))
    out.set_body(b"v=0\r\n")
    wire = out.serialize()
    parse_message(wire)
    if msg.is_request:
        response = build_response(msg, 486, "Busy Here", to_tag="t1")
        parse_message(response.serialize())


def exercise_datagram(data: bytes) -> str:
    """Run one case; returns 'ok', 'parse-error' or 'keepalive'."""
    try:
        msg = parse_datagram(data)
    except ParseError as exc:
        if exc.status not in (400, 501, 505):
            raise Mismatch(f"unexpected status {exc.status}") from exc
        if exc.can_respond:
            assert exc.message is not None
            response = build_response(exc.message, exc.status, "Bad Request", to_tag="e1")
            parse_message(response.serialize())
        return "parse-error"
    if msg is None:
        return "keepalive"
    _read_everything(msg)
    _check_fast_paths(msg)
    _check_round_trip(msg)
    _edit(msg)
    return "ok"


def _framer_outcome(items: list[SipMessage | ParseError]) -> list[object]:
    return [("error", str(i)) if isinstance(i, ParseError) else ("msg", i.serialize())
            for i in items]


def exercise_stream(rng: random.Random, datagrams: list[bytes]) -> None:
    """The same byte stream fed whole and in random chunks must frame the same way."""
    stream = b"".join(d + rng.choice((b"", b"", b"\r\n", b"\r\n\r\n")) for d in datagrams)
    limit = rng.choice((65535, 65535, 2000))
    whole = StreamFramer(limit)
    expected = _framer_outcome(whole.feed(stream))
    chunked = StreamFramer(limit)
    got: list[SipMessage | ParseError] = []
    pos = 0
    while pos < len(stream):
        step = rng.choice((1, 2, 3, 7, 64, 500, 4096))
        got.extend(chunked.feed(stream[pos:pos + step]))
        pos += step
    if _framer_outcome(got) != expected or chunked.broken != whole.broken:
        raise Mismatch("StreamFramer output depends on chunking")
    for item in got:
        if isinstance(item, SipMessage):
            _read_everything(item)


# ---- driver -------------------------------------------------------------------------------------
class Hang(Exception):
    """Raised by the alarm when one case runs far too long."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang("case still running after the hang limit")


def load_corpus() -> list[bytes]:
    corpus = [p.read_bytes() for p in sorted(CORPUS_DIR.glob("*.dat"))]
    return corpus + TYPICAL * 4  # weight the typical carrier messages


def save_finding(out: Path, kind: str, data: bytes, detail: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(data).hexdigest()[:12]
    path = out / f"{kind}-{digest}.bin"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(detail)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "sip-fuzz-findings",
                    help="where findings are saved (input .bin + traceback .txt)")
    ap.add_argument("--slow", type=float, default=1.0, help="report cases slower than this (s)")
    ap.add_argument("--hang", type=int, default=20, help="abort a case after this many seconds")
    ap.add_argument("--stream-every", type=int, default=10,
                    help="one StreamFramer case per this many datagram cases")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    corpus = load_corpus()
    signal.signal(signal.SIGALRM, _on_alarm)
    counts = {"ok": 0, "parse-error": 0, "keepalive": 0, "stream": 0}
    findings: dict[str, int] = {}
    slow_cases = 0
    print(f"seed {seed}; {len(corpus)} seed messages; {args.cases} cases", flush=True)
    t0 = last = time.perf_counter()
    for n in range(1, args.cases + 1):
        stream_case = n % args.stream_every == 0
        if stream_case:
            datagrams = [mutate(rng, corpus) if rng.random() < 0.5 else rng.choice(corpus)
                         for _ in range(rng.randint(1, 4))]
            data = b"".join(datagrams)
        else:
            data = mutate(rng, corpus)
        signal.alarm(args.hang)
        started = time.perf_counter()
        try:
            if stream_case:
                exercise_stream(rng, datagrams)
                counts["stream"] += 1
            else:
                counts[exercise_datagram(data)] += 1
        except Exception as exc:  # every exception except ParseError is a finding
            signal.alarm(0)
            where = traceback.extract_tb(exc.__traceback__)[-1]
            key = f"{type(exc).__name__}@{Path(where.filename).name}:{where.lineno}"
            findings[key] = findings.get(key, 0) + 1
            if findings[key] <= 3:
                path = save_finding(args.out, type(exc).__name__, data,
                                    f"case {n} seed {seed} stream={stream_case}\n"
                                    + traceback.format_exc())
                print(f"FINDING {key}: {exc!r} -> {path}", flush=True)
        finally:
            signal.alarm(0)
        elapsed = time.perf_counter() - started
        if elapsed > args.slow:
            slow_cases += 1
            path = save_finding(args.out, "slow", data, f"case {n} took {elapsed:.3f} s")
            print(f"SLOW case {n}: {elapsed:.3f} s -> {path}", flush=True)
        now = time.perf_counter()
        if now - last >= 30:
            last = now
            print(f"{n} cases, {n / (now - t0):.0f} cases/s, findings {sum(findings.values())}",
                  flush=True)
    total = time.perf_counter() - t0
    print(f"done: {args.cases} cases in {total:.1f} s ({args.cases / total:.0f} cases/s); "
          f"parsed {counts['ok']}, ParseError {counts['parse-error']}, "
          f"keep-alive {counts['keepalive']}, stream cases {counts['stream']}; "
          f"slow cases {slow_cases}; findings {sum(findings.values())}")
    for key, count in sorted(findings.items(), key=lambda kv: -kv[1]):
        print(f"  {count:7d}  {key}")
    return 1 if findings or slow_cases else 0


if __name__ == "__main__":
    sys.exit(main())
