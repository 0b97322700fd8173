"""Raw SIP over UDP for integration tests that must write every byte themselves: attacks, odd
number forms, bodies SIPp cannot build.

A `Peer` is one UDP socket that keeps a log of what reached it and answers retransmissions of
requests it already answered (so a stateful proxy's timers never leak into the next test). A
`Dialog` is one call set up through the proxy between two peers, with everything each side
learned (route set, remote target, its own Call-ID and tags) to send in-dialog requests the way
a real user agent would (RFC 3261 §12, §13.2.2.4).
"""

from __future__ import annotations

import itertools
import os
import re
import select
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from proxy.sip.address import parse_name_addr
from proxy.sip.errors import ParseError
from proxy.sip.message import SipMessage, parse_message

_seq = itertools.count(1)

X = "700100000000001"
A = "13800000001"
B = "13900000001"

Headers = Iterable[tuple[str, str]]


def uniq(prefix: str = "") -> str:
    """A token no other test (and no earlier run against the same proxy) uses."""
    return f"{prefix}{next(_seq)}{os.urandom(4).hex()}"


def sdp(user: str, version: int = 1, port: int = 40000) -> bytes:
    return (
        f"v=0\r\no={user} {version} {version} IN IP4 127.0.0.1\r\ns=-\r\n"
        f"c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {port} RTP/AVP 0 8\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
    ).encode()


def build_request(method: str, ruri: str, headers: Headers, body: bytes = b"") -> bytes:
    """A request with exactly these rows (in order), then Content-Length."""
    rows = [f"{method} {ruri} SIP/2.0", *(f"{n}: {v}" for n, v in headers),
            f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(rows).encode("latin-1") + body


def build_response(request: SipMessage, status: int, reason: str, *, to_tag: str | None = None,
                   headers: Headers = (), body: bytes = b"", record_route: bool = False) -> bytes:
    """A response as a UAS builds it (RFC 3261 §8.2.6): Via, From, To, Call-ID, CSeq rows copied
    byte for byte (To gets `to_tag` when it has none), then Record-Route rows when asked
    (RFC 3261 §12.1.1), then `headers`."""
    rows: list[bytes] = [f"SIP/2.0 {status} {reason}".encode()]
    for name, row in request.rows:
        if name in ("via", "from", "call-id", "cseq"):
            rows.append(row)
        elif name == "to":
            if to_tag is not None and request.to.tag is None:
                row = row.rstrip() + f";tag={to_tag}".encode()
            rows.append(row)
        elif name == "record-route" and record_route:
            rows.append(row)
    rows += [f"{n}: {v}".encode("latin-1") for n, v in headers]
    rows += [b"Content-Length: %d" % len(body), b""]
    return b"\r\n".join(rows) + b"\r\n" + body


def row_of(msg: SipMessage, name: str) -> bytes | None:
    """The first raw row (b'To: …', no CRLF) of a header, None when absent."""
    return next((row for n, row in msg.rows if n == name), None)


def uri_of(value: str) -> str:
    """The URI inside a name-addr header value."""
    return str(parse_name_addr(value, "test").uri)


def token_of(route_value: str) -> str:
    """The sealed dialog token (`s7=`) of a Record-Route/Route value."""
    m = re.search(r";s7=([^;>]+)", route_value)
    assert m is not None, f"no s7= dialog token in {route_value!r}"
    return m.group(1)


# ---- what leaks ----------------------------------------------------------------------------------

_PCT_DIGIT = re.compile(rb"%3([0-9])")
_SEPARATORS = re.compile(rb"[ \-.()]")


def _digits_view(data: bytes) -> bytes:
    return _SEPARATORS.sub(b"", _PCT_DIGIT.sub(rb"\1", data))


def leaks(data: bytes, number: str) -> list[str]:
    """Lines of `data` carrying `number` in any textual form: plain, +86/0086-prefixed, with
    ` -.()` separators, %-escaped digits. Empty when the number is nowhere."""
    digits = number.encode()
    hits = [line.decode("latin-1") for line in data.split(b"\n")
            if digits in _digits_view(line)]
    if not hits and digits in _digits_view(data.replace(b"\r\n", b"")):
        hits.append("(split over lines) " + data.decode("latin-1")[:300])
    return hits


def bcd(number: str) -> bytes:
    """ITU-T Q.763 address signals: two digits an octet, the first in the low nibble, a filler
    0 in the last high nibble when the count is odd."""
    digits = [int(d) for d in number] + ([0] if len(number) % 2 else [])
    return bytes(digits[i] | digits[i + 1] << 4 for i in range(0, len(digits), 2))


def isup_iam(called: str, calling: str) -> bytes:
    """A Q.763 Initial Address Message: called party X, calling party `calling` (both national
    numbers, nature of address 3, ISDN numbering plan)."""
    def number(n: str, second_octet: int) -> bytes:
        oe = 0x80 if len(n) % 2 else 0x00
        return bytes([oe | 0x03, second_octet]) + bcd(n)

    called_p = number(called, 0x10)  # INN allowed, numbering plan ISDN (E.164)
    calling_p = number(calling, 0x13)  # NI complete, ISDN, presentation allowed, network provided
    fixed = bytes([
        0x01,  # message type: IAM
        0x00,  # nature of connection indicators
        0x60, 0x01,  # forward call indicators
        0x0A,  # calling party's category: ordinary subscriber
        0x00,  # transmission medium requirement: speech
    ])
    # pointers count from their own octet: the called party number starts 2 octets after the
    # first pointer, the optional part right after the called party number
    pointers = bytes([2, 1 + 1 + len(called_p)])
    mandatory = bytes([len(called_p)]) + called_p
    optional = bytes([0x0A, len(calling_p)]) + calling_p + b"\x00"  # calling party number, end
    return fixed + pointers + mandatory + optional


# ---- a socket that speaks SIP --------------------------------------------------------------------

@dataclass
class Received:
    msg: SipMessage
    raw: bytes
    addr: tuple[str, int]

    def __str__(self) -> str:
        return self.msg.start_line.decode("latin-1")


def _key(msg: SipMessage) -> tuple:
    branch = msg.top_via.branch
    head = msg.method if msg.is_request else msg.status
    return (msg.is_request, head, msg.call_id, msg.header("cseq"), branch)


class Peer:
    """A UDP socket on `host` that records every new message and re-answers retransmissions."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, name: str = "") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()
        self.name = name or f"{self.host}:{self.port}"
        self.log: list[Received] = []  # every new message, in arrival order
        self.pending: list[Received] = []  # new messages no `wait` has taken yet
        self._seen: set[tuple] = set()
        self._answers: dict[tuple, tuple[bytes, tuple[str, int]]] = {}
        self.unparsable: list[bytes] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes, dest: tuple[str, int]) -> None:
        self.sock.sendto(data, dest)

    def _pump(self, timeout: float) -> None:
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not ready:
            return
        data, addr = self.sock.recvfrom(70000)
        try:
            msg = parse_message(data)
            key = _key(msg)
        except ParseError:
            self.unparsable.append(data)
            return
        if key in self._seen:  # a retransmission
            answer = self._answers.get(key)
            if answer is not None:
                self.sock.sendto(*answer)
            return
        self._seen.add(key)
        got = Received(msg, data, addr)
        self.log.append(got)
        self.pending.append(got)

    def wait(self, pred: Callable[[SipMessage], bool], timeout: float = 3.0) -> Received | None:
        """The first new message matching `pred` (others stay pending), None after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for i, got in enumerate(self.pending):
                if pred(got.msg):
                    del self.pending[i]
                    return got
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._pump(left)

    def quiet(self, seconds: float) -> list[Received]:
        """Everything new (not a retransmission) that arrives within `seconds`, plus what was
        pending; the pending list is emptied."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._pump(left)
        got, self.pending = self.pending, []
        return got

    def drain(self) -> None:
        """Forget what is pending (late answers of an earlier test)."""
        self.quiet(0.03)

    def answer(self, request: Received, status: int, reason: str, **kw: object) -> bytes:
        """Answer `request` to where it came from; retransmissions get the same answer."""
        data = build_response(request.msg, status, reason, **kw)  # type: ignore[arg-type]
        self._answers[_key(request.msg)] = (data, request.addr)
        self.sock.sendto(data, request.addr)
        return data


def ack_failure(peer: Peer, request: bytes, response: Received, dest: tuple[str, int]) -> None:
    """The ACK for a non-2xx final response to an INVITE (RFC 3261 §17.1.1.3): hop by hop, the
    INVITE's branch, Request-URI and Route, the response's To."""
    inv = parse_message(request)
    rows = [(name, row) for name, row in inv.rows if name in ("via", "route", "from", "call-id")]
    top_via = next(i for i, (name, _) in enumerate(rows) if name == "via")
    rows = [r for i, r in enumerate(rows) if r[0] != "via" or i == top_via]
    lines = [f"ACK {inv.uri_text} SIP/2.0".encode(), *(row for _, row in rows),
             row_of(response.msg, "to") or b"", f"CSeq: {inv.cseq[0]} ACK".encode(),
             b"Max-Forwards: 70", b"Content-Length: 0", b"", b""]
    peer.send(b"\r\n".join(lines), dest)


def is_request(method: str) -> Callable[[SipMessage], bool]:
    return lambda m: m.is_request and m.method == method


def is_response(status: int | None = None, method: str | None = None,
                final: bool = False) -> Callable[[SipMessage], bool]:
    def pred(m: SipMessage) -> bool:
        if m.is_request:
            return False
        if method is not None and m.cseq[1] != method:
            return False
        if final and m.status < 200:
            return False
        return status is None or m.status == status
    return pred


def describe(messages: Iterable[Received]) -> str:
    return "; ".join(f"{got} (from {got.addr[0]}:{got.addr[1]})" for got in messages) or "nothing"


# ---- a call through the proxy --------------------------------------------------------------------

@dataclass
class Dialog:
    """One call A → proxy → B, and what each side knows of it."""

    proxy: tuple[str, int]
    a: Peer
    b: Peer
    a_call_id: str
    a_from: str  # A's local party (with A's tag), as A sends it
    a_to: str = ""  # A's remote party, as the 2xx gave it (with B's tag as A sees it)
    a_target: str = ""  # B's Contact URI as A sees it: A's in-dialog Request-URI
    a_routes: list[str] = field(default_factory=list)  # A's route set (RR of the 2xx, reversed)
    b_call_id: str = ""
    b_from: str = ""  # B's local party: the To of the INVITE B got, with B's tag
    b_to: str = ""  # B's remote party: the From of the INVITE B got
    b_target: str = ""  # A's Contact URI as B sees it
    b_routes: list[str] = field(default_factory=list)  # the INVITE's Record-Route, in order
    a_tag: str = ""
    b_tag: str = ""
    a_cseq: int = 1
    b_cseq: int = 1000
    invite_at_b: Received | None = None
    provisional_at_a: Received | None = None
    ok_at_a: Received | None = None
    a_log_start: int = 0  # index in a.log where this call's messages start

    def a_received(self) -> list[Received]:
        return self.a.log[self.a_log_start:]

    def token(self) -> str:
        return token_of(self.a_routes[-1])

    def request_from_a(self, method: str, *, sender: Peer | None = None, ruri: str | None = None,
                       routes: list[str] | None = None, call_id: str | None = None,
                       to: str | None = None, headers: Headers = (), body: bytes = b"",
                       cseq: int | None = None) -> bytes:
        """An in-dialog request as A sends it (from `sender`'s socket when given)."""
        if cseq is None and method != "ACK":
            self.a_cseq += 1
        return self._send(sender or self.a, method, ruri or self.a_target,
                          self.a_routes if routes is None else routes,
                          self.a_from, self.a_to if to is None else to,
                          call_id or self.a_call_id, cseq or self.a_cseq, headers, body)

    def request_from_b(self, method: str, *, from_: str | None = None, ruri: str | None = None,
                       routes: list[str] | None = None, headers: Headers = (),
                       body: bytes = b"") -> bytes:
        """An in-dialog request as B sends it."""
        if method != "ACK":
            self.b_cseq += 1
        return self._send(self.b, method, ruri or self.b_target, self.b_routes,
                          from_ or self.b_from, self.b_to, self.b_call_id, self.b_cseq,
                          headers, body)

    def _send(self, peer: Peer, method: str, ruri: str, routes: list[str], from_: str, to: str,
              call_id: str, cseq: int, headers: Headers, body: bytes) -> bytes:
        rows = [("Via", f"SIP/2.0/UDP {peer.host}:{peer.port};branch={uniq('z9hG4bKt')};rport"),
                ("Max-Forwards", "70"),
                *(("Route", r) for r in routes),
                ("From", from_), ("To", to), ("Call-ID", call_id), ("CSeq", f"{cseq} {method}"),
                *headers]
        data = build_request(method, ruri, rows, body)
        peer.send(data, self.proxy)
        return data

    def ack_from_a(self) -> Received:
        """A's ACK for the 2xx along the route set; returns it as B got it."""
        assert self.ok_at_a is not None
        self.request_from_a("ACK", cseq=self.ok_at_a.msg.cseq[0])
        got = self.b.wait(is_request("ACK"))
        assert got is not None, f"A's ACK never reached B; B got {describe(self.b.pending)}"
        return got

    def bye_from_a(self) -> None:
        """Hang up from A; B answers 200; returns once A has its 200 (best effort)."""
        self.request_from_a("BYE")
        bye = self.b.wait(is_request("BYE"))
        if bye is not None:
            self.b.answer(bye, 200, "OK")
            self.a.wait(is_response(200, "BYE"))


def invite_headers(a: Peer, proxy_port: int, *, x: str = X, a_number: str = A, call_id: str,
                   tag: str, contact: str | None = None, pai: bool = True) -> list[tuple[str, str]]:
    """The rows of A's INVITE (without Content-Type)."""
    rows = [
        ("Via", f"SIP/2.0/UDP {a.host}:{a.port};branch={uniq('z9hG4bKa')};rport"),
        ("Max-Forwards", "70"),
        ("From", f"<sip:{a_number}@127.0.0.1>;tag={tag}"),
        ("To", f"<sip:{x}@127.0.0.1:{proxy_port}>"),
        ("Call-ID", call_id),
        ("CSeq", "1 INVITE"),
        ("Contact", contact or f"<sip:{a_number}@127.0.0.1:{a.port}>"),
    ]
    if pai:
        rows.append(("P-Asserted-Identity", f"<sip:{a_number}@127.0.0.1>"))
    return rows


def start_call(proxy_port: int, a: Peer, b: Peer, *, x: str = X, call_id: str | None = None,
               contact: str | None = None, pai: bool = True,
               headers: Headers | None = None, body: bytes | None = None,
               content_type: str = "application/sdp") -> tuple[Dialog, bytes]:
    """A sends its INVITE to X (after both peers forget anything pending); returns the dialog
    so far and the bytes A sent. `headers` are extra rows after the defaults (Via … Contact,
    P-Asserted-Identity unless `pai` is false); Content-Type follows when there is a body."""
    a.drain()
    b.drain()
    call_id = call_id or f"{uniq('c')}@127.0.0.1"
    tag = uniq("a")
    rows = invite_headers(a, proxy_port, x=x, call_id=call_id, tag=tag, contact=contact, pai=pai)
    if headers is not None:
        rows += list(headers)
    body = sdp(A) if body is None else body
    if body:
        rows.append(("Content-Type", content_type))
    data = build_request("INVITE", f"sip:{x}@127.0.0.1:{proxy_port}", rows, body)
    dialog = Dialog(("127.0.0.1", proxy_port), a, b, call_id,
                    a_from=f"<sip:{A}@127.0.0.1>;tag={tag}", a_tag=tag,
                    a_log_start=len(a.log))
    a.send(data, dialog.proxy)
    return dialog, data


def answer_call(dialog: Dialog, *, ringing_reason: str = "Ringing",
                contact: str | None = None, ok_headers: Headers = (),
                ack: bool = True) -> Dialog:
    """B takes the INVITE, answers 180 then 200 (Record-Route copied, To tag, Contact, SDP); A
    takes both; A ACKs along its route set unless `ack` is false."""
    a, b = dialog.a, dialog.b
    inv = b.wait(is_request("INVITE"))
    assert inv is not None, (
        f"A's INVITE never reached B; A got {describe(a.pending)}")
    dialog.invite_at_b = inv
    msg = inv.msg
    dialog.b_tag = uniq("b")
    dialog.b_call_id = msg.call_id
    dialog.b_from = (row_of(msg, "to") or b"").partition(b":")[2].strip().decode("latin-1") \
        + f";tag={dialog.b_tag}"
    dialog.b_to = (row_of(msg, "from") or b"").partition(b":")[2].strip().decode("latin-1")
    dialog.b_target = uri_of(msg.header("contact") or "")
    dialog.b_routes = msg.header_values("record-route")
    contact = contact or f"<sip:{B}@127.0.0.1:{b.port}>"
    b.answer(inv, 180, ringing_reason, to_tag=dialog.b_tag, record_route=True,
             headers=[("Contact", contact)])
    b.answer(inv, 200, "OK", to_tag=dialog.b_tag, record_route=True,
             headers=[("Contact", contact), *ok_headers, ("Content-Type", "application/sdp")],
             body=sdp(B))
    ringing = a.wait(is_response(180))
    ok = a.wait(is_response(200, "INVITE"))
    assert ok is not None, f"B's 200 never reached A; A got {describe(a.pending)}"
    dialog.provisional_at_a = ringing
    dialog.ok_at_a = ok
    dialog.a_to = (row_of(ok.msg, "to") or b"").partition(b":")[2].strip().decode("latin-1")
    dialog.a_target = uri_of(ok.msg.header("contact") or "")
    dialog.a_routes = list(reversed(ok.msg.header_values("record-route")))
    if ack:
        dialog.ack_from_a()
    return dialog


def establish(proxy_port: int, a: Peer, b: Peer, **kw: object) -> Dialog:
    """A whole call set-up: INVITE, 180, 200, ACK."""
    answer_keys = {"ringing_reason", "contact_b", "ok_headers", "ack"}
    start_kw = {k: v for k, v in kw.items() if k not in answer_keys}
    answer_kw = {("contact" if k == "contact_b" else k): v for k, v in kw.items()
                 if k in answer_keys}
    dialog, _ = start_call(proxy_port, a, b, **start_kw)  # type: ignore[arg-type]
    return answer_call(dialog, **answer_kw)  # type: ignore[arg-type]
