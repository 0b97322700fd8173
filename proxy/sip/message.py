"""SIP messages: lazy parsing, byte-range edits, serialisation (RFC 3261 §7, §18.3, §20, §25).

Parsing splits the start line and the header rows once; a header's structure is parsed only when
someone asks for it (and then cached). Each row keeps its original bytes, so what the proxy does
not touch goes out exactly as it came in. Structured values are handled as latin-1 text, which maps
bytes 1:1 and so round-trips any octet (UTF-8 display names included).
"""

from __future__ import annotations

import re
from typing import Any

from proxy.sip.address import (
    NameAddr,
    Via,
    parse_cseq,
    parse_name_addr,
    parse_via,
    split_list,
)
from proxy.sip.errors import ParseError
from proxy.sip.uri import OtherUri, SipUri, parse_uri

# RFC 3261 §7.3.3 plus the compact forms registered since (RFC 3515, 3841, 3892, 4028, 4474, 6665)
COMPACT_FORMS = {
    "i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length",
    "c": "content-type", "f": "from", "s": "subject", "k": "supported", "t": "to", "v": "via",
    "o": "event", "r": "refer-to", "b": "referred-by", "u": "allow-events",
    "x": "session-expires", "y": "identity", "a": "accept-contact", "j": "reject-contact",
    "d": "request-disposition", "n": "identity-info",
}
# Headers whose rows may hold several comma-separated values (RFC 3261 §7.3.1). Others (Date,
# WWW-Authenticate, …) contain commas inside a single value and are never split.
LIST_HEADERS = frozenset({
    "via", "route", "record-route", "contact", "allow", "supported", "require", "proxy-require",
    "unsupported", "accept", "accept-encoding", "accept-language", "allow-events",
    "content-encoding", "content-language", "in-reply-to", "history-info", "diversion",
    "p-asserted-identity", "p-preferred-identity", "path", "service-route", "reason", "privacy",
    "warning", "alert-info", "call-info", "error-info",
})
SINGLE_HEADERS = ("from", "to", "call-id", "cseq", "max-forwards", "content-length")
CANONICAL_NAMES = {
    "via": "Via", "from": "From", "to": "To", "call-id": "Call-ID", "cseq": "CSeq",
    "contact": "Contact", "content-length": "Content-Length", "content-type": "Content-Type",
    "max-forwards": "Max-Forwards", "route": "Route", "record-route": "Record-Route",
    "p-asserted-identity": "P-Asserted-Identity", "www-authenticate": "WWW-Authenticate",
    "rseq": "RSeq", "rack": "RAck", "mime-version": "MIME-Version", "sip-etag": "SIP-ETag",
    "sip-if-match": "SIP-If-Match",
}
KNOWN_METHODS = frozenset({
    "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "UPDATE", "INFO",
    "REFER", "SUBSCRIBE", "NOTIFY", "MESSAGE", "PUBLISH",
})

_TOKEN_BYTES = re.compile(rb"[A-Za-z0-9\-.!%*_+`'~]+")
_FOLD = re.compile(r"\r?\n[ \t]+")
_CL_IN_HEAD = re.compile(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\S*)")
_NAME_CACHE: dict[bytes, str] = {}


def canonical_name(raw: bytes) -> str:
    """Lower-case long form of a header name as written on the wire (`v ` → `via`)."""
    name = _NAME_CACHE.get(raw)
    if name is not None:
        return name
    stripped = raw.strip(b" \t")
    if not _TOKEN_BYTES.fullmatch(stripped):
        raise ParseError(f"bad header name {stripped[:40]!r}")
    lower = stripped.decode("ascii").lower()
    name = COMPACT_FORMS.get(lower, lower)
    if len(_NAME_CACHE) < 4096:  # bounded: hostile peers must not grow it forever
        _NAME_CACHE[raw] = name
    return name


def display_name(name: str) -> str:
    """How we write a header name we add: `call-id` → `Call-ID`."""
    return CANONICAL_NAMES.get(name) or "-".join(p.capitalize() for p in name.split("-"))


def _row_value(row: bytes) -> str:
    value = row[row.find(b":") + 1:].decode("latin-1")
    if "\n" in value:
        value = _FOLD.sub(" ", value)
    return value.strip()


class SipMessage:
    """A request or a response. Build with `parse_message`; edit; `serialize()` to bytes."""

    __slots__ = ("_cache", "_start", "body", "method", "reason", "rows", "status", "uri_text")

    def __init__(self, start: bytes, rows: list[tuple[str, bytes]], body: bytes) -> None:
        self._start = start
        self.rows = rows  # (canonical lower-case name, raw row bytes without CRLF)
        self.body = body
        self._cache: dict[str, Any] = {}
        self.method = ""
        self.uri_text = ""
        self.status = 0
        self.reason = ""

    # ---- start line ------------------------------------------------------------
    @property
    def is_request(self) -> bool:
        return self.status == 0

    @property
    def uri(self) -> SipUri | OtherUri:
        """The Request-URI, parsed on first use."""
        uri = self._cache.get("@uri")
        if uri is None:
            uri = self._cache["@uri"] = parse_uri(self.uri_text)
        return uri

    def set_uri(self, uri: SipUri | str) -> None:
        self.uri_text = str(uri)
        self._cache.pop("@uri", None)
        self._start = f"{self.method} {self.uri_text} SIP/2.0".encode("latin-1")

    @property
    def start_line(self) -> bytes:
        return self._start

    # ---- reading headers -----------------------------------------------------------
    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.rows)

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.rows if n == name)

    def header(self, name: str) -> str | None:
        """The first row's value of a header (unfolded, stripped), None when absent."""
        for n, row in self.rows:
            if n == name:
                return _row_value(row)
        return None

    def header_values(self, name: str) -> list[str]:
        """Every value of a header, over all its rows; list headers split on their commas."""
        out: list[str] = []
        split = name in LIST_HEADERS
        for n, row in self.rows:
            if n == name:
                value = _row_value(row)
                if split:
                    out.extend(v for v in split_list(value) if v)
                else:
                    out.append(value)
        return out

    def _parsed(self, key: str, parse: Any) -> Any:
        cache = self._cache
        if key in cache:
            return cache[key]
        value = self.header(key)
        if value is None:
            raise ParseError(f"missing {display_name(key)} header", message=self)
        result = cache[key] = parse(value)
        return result

    @property
    def from_(self) -> NameAddr:
        return self._parsed("from", lambda v: parse_name_addr(v, "From"))

    @property
    def to(self) -> NameAddr:
        return self._parsed("to", lambda v: parse_name_addr(v, "To"))

    @property
    def call_id(self) -> str:
        return self._parsed("call-id", _check_call_id)

    @property
    def cseq(self) -> tuple[int, str]:
        return self._parsed("cseq", parse_cseq)

    @property
    def top_via(self) -> Via:
        via = self._cache.get("@via")
        if via is None:
            values = self.header_values("via")
            if not values:
                raise ParseError("missing Via header", message=self)
            via = self._cache["@via"] = parse_via(values[0])
        return via

    @property
    def max_forwards(self) -> int | None:
        value = self.header("max-forwards")
        if value is None:
            return None
        if not value.isdigit() or len(value) > 5 or int(value) > 255:
            raise ParseError(f"bad Max-Forwards {value[:20]!r}", message=self)
        return int(value)

    def name_addrs(self, name: str) -> list[NameAddr]:
        """Every value of a name-addr header (Contact, Route, Record-Route, PAI …), parsed."""
        return [parse_name_addr(v, display_name(name)) for v in self.header_values(name)]

    def validate(self) -> None:
        """Check what a proxy relies on (RFC 3261 §8.1.1, §16.3). Raises ParseError.

        Parsing stays lazy for everything else; the results are cached, so the proxy pays for
        these headers once.
        """
        try:
            self._validate()
        except ParseError as exc:
            exc.message = self
            raise

    def _validate(self) -> None:
        for name in SINGLE_HEADERS:
            if self.count(name) > 1:
                raise ParseError(f"more than one {display_name(name)} header")
        if self.is_request:
            for name in ("via", "from", "to", "call-id", "cseq"):
                if not self.has(name):
                    raise ParseError(f"missing {display_name(name)} header")
            uri = self.uri
            if isinstance(uri, SipUri) and uri.headers:
                # RFC 4475 §3.1.2.11: headers never belong in a Request-URI
                raise ParseError("Request-URI carries URI headers")
            _num, method = self.cseq
            if method != self.method:
                known = self.method in KNOWN_METHODS
                raise ParseError("CSeq method does not match the request method",
                                 status=400 if known else 501)
            self.max_forwards  # noqa: B018
            if self.has("contact"):
                values = self.header_values("contact")
                if values != ["*"]:
                    self.name_addrs("contact")
        else:
            if not self.has("via") or not self.has("cseq"):
                raise ParseError("response without Via or CSeq")
            self.cseq  # noqa: B018
        self.from_  # noqa: B018
        self.to  # noqa: B018
        self.call_id  # noqa: B018
        self.top_via  # noqa: B018

    # ---- editing -------------------------------------------------------------------
    def _forget(self, name: str) -> None:
        self._cache.pop(name, None)
        if name == "via":
            self._cache.pop("@via", None)

    def set_header(self, name: str, value: str) -> None:
        """Replace a header (first row keeps its place, other rows go); append if absent."""
        row = f"{display_name(name)}: {value}".encode("latin-1")
        rows = self.rows
        self._forget(name)
        for i, (n, _) in enumerate(rows):
            if n == name:
                rows[i] = (name, row)
                j = i + 1
                while j < len(rows):
                    if rows[j][0] == name:
                        del rows[j]
                    else:
                        j += 1
                return
        rows.append((name, row))

    def set_header_values(self, name: str, values: list[str]) -> None:
        """Replace a header by one row per value (removing it when the list is empty)."""
        if not values:
            self.remove_header(name)
            return
        rows = self.rows
        self._forget(name)
        first = next((i for i, (n, _) in enumerate(rows) if n == name), len(rows))
        self.rows = rows = [r for r in rows if r[0] != name]
        label = display_name(name)
        rows[first:first] = [(name, f"{label}: {v}".encode("latin-1")) for v in values]

    def remove_header(self, name: str) -> int:
        """Drop every row of a header; returns how many rows went."""
        before = len(self.rows)
        self.rows = [r for r in self.rows if r[0] != name]
        self._forget(name)
        return before - len(self.rows)

    def insert_header(self, name: str, value: str, index: int = 0) -> None:
        self._forget(name)
        self.rows.insert(index, (name, f"{display_name(name)}: {value}".encode("latin-1")))

    def push_via(self, value: str) -> None:
        """Add our Via on top (RFC 3261 §16.6 step 8)."""
        self._forget("via")
        self.rows.insert(0, ("via", b"Via: " + value.encode("latin-1")))

    def pop_via(self) -> str:
        """Remove the top Via value (RFC 3261 §16.7 step 3); returns it."""
        rows = self.rows
        for i, (n, row) in enumerate(rows):
            if n == "via":
                values = split_list(_row_value(row))
                self._forget("via")
                if len(values) == 1:
                    del rows[i]
                else:
                    rows[i] = ("via", ("Via: " + ", ".join(values[1:])).encode("latin-1"))
                return values[0]
        raise ParseError("no Via to remove")

    def prepend_record_route(self, value: str) -> None:
        """Add our Record-Route on top of the list (RFC 3261 §16.6 step 4)."""
        rows = self.rows
        index = next((i for i, (n, _) in enumerate(rows) if n == "record-route"), None)
        if index is None:
            index = next((i for i, (n, _) in enumerate(rows) if n not in ("via",)), len(rows))
        rows.insert(index, ("record-route", b"Record-Route: " + value.encode("latin-1")))

    def set_body(self, body: bytes) -> None:
        self.body = body
        self.set_header("content-length", str(len(body)))

    # ---- output ----------------------------------------------------------------------
    def serialize(self) -> bytes:
        """Wire bytes. A message that came without Content-Length (UDP, RFC 2543) gets one."""
        parts = [self._start]
        has_cl = False
        for name, row in self.rows:
            parts.append(row)
            if name == "content-length":
                has_cl = True
        if not has_cl:
            parts.append(b"Content-Length: %d" % len(self.body))
        parts.append(b"")
        parts.append(self.body)
        return b"\r\n".join(parts)

    def copy(self) -> SipMessage:
        """An independent copy for a second outgoing version (rows are shared immutable bytes)."""
        other = SipMessage(self._start, list(self.rows), self.body)
        other.method, other.uri_text = self.method, self.uri_text
        other.status, other.reason = self.status, self.reason
        other._cache = dict(self._cache)
        return other

    def __repr__(self) -> str:
        return f"SipMessage({self._start[:80]!r})"


def _check_call_id(value: str) -> str:
    if not value or any(c in value for c in " \t\r\n"):
        raise ParseError(f"bad Call-ID {value[:40]!r}")
    return value


def _split_head(head: bytes) -> list[tuple[str, bytes]]:
    if not head:
        return []
    lines = head.split(b"\r\n")
    get = _NAME_CACHE.get
    # fast path: every row starts with a header name seen before (no folds, no odd names)
    names = [get(line.partition(b":")[0]) for line in lines]
    if None not in names:
        return list(zip(names, lines, strict=True))  # type: ignore[arg-type]
    return _split_head_slow(lines)


def _split_head_slow(lines: list[bytes]) -> list[tuple[str, bytes]]:
    rows: list[tuple[str, bytes]] = []
    for line in lines:
        if not line:
            continue
        first = line[0]
        if first == 32 or first == 9:  # folded continuation (RFC 3261 §7.3.1)
            if not rows:
                raise ParseError("header block starts with a continuation line")
            name, prev = rows[-1]
            rows[-1] = (name, prev + b"\r\n" + line)
            continue
        colon = line.find(b":")
        if colon <= 0:
            raise ParseError(f"header row without a name: {line[:40]!r}")
        rows.append((canonical_name(line[:colon]), line))
    return rows


def _parse_start(msg: SipMessage, start: bytes) -> None:
    if start.startswith(b"SIP/"):
        parts = start.split(b" ", 2)
        if len(parts) < 2 or parts[0] != b"SIP/2.0":
            raise ParseError("bad status line")
        code = parts[1]
        if len(code) != 3 or not code.isdigit() or not 100 <= int(code) <= 699:
            raise ParseError(f"bad status code {code[:10]!r}")
        msg.status = int(code)
        msg.reason = parts[2].decode("latin-1") if len(parts) == 3 else ""
        return
    parts = start.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise ParseError("bad request line (exactly one SP between method, URI and version)")
    method, uri, version = parts
    if not _TOKEN_BYTES.fullmatch(method):
        raise ParseError(f"bad method {method[:20]!r}")
    msg.method = method.decode("ascii")
    msg.uri_text = uri.decode("latin-1")
    if version != b"SIP/2.0":
        if version.startswith(b"SIP/"):
            raise ParseError(f"unsupported SIP version {version[:20]!r}", status=505)
        raise ParseError(f"bad SIP version {version[:20]!r}")


def parse_message(data: bytes, *, stream: bool = False) -> SipMessage:
    """Parse one message from a datagram (or, with stream=True, one framed TCP message).

    Over UDP a missing Content-Length means the body is the rest of the datagram and octets past
    Content-Length are ignored (RFC 3261 §18.3). Raises ParseError only.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        # no empty line: headers only (RFC 4475 baddn ends like this)
        head, body_start = data.rstrip(b"\r\n"), len(data)
    else:
        head, body_start = data[:end], end + 4
    nl = head.find(b"\r\n")
    start, rest = (head, b"") if nl < 0 else (head[:nl], head[nl + 2:])
    msg = SipMessage(start, [], b"")
    try:
        _parse_start(msg, start)
    except ParseError as exc:
        # keep the rows when they are readable, so a bad request line can still be answered
        if not start.startswith(b"SIP/"):
            msg.method = start.split(b" ", 1)[0].decode("latin-1")
            try:
                msg.rows = _split_head(rest)
                exc.message = msg
            except ParseError:
                pass
        raise exc from None
    msg.rows = _split_head(rest)
    cl_values = [_row_value(row) for name, row in msg.rows if name == "content-length"]
    available = len(data) - body_start
    if not cl_values:
        if stream:
            raise ParseError("missing Content-Length on a stream transport", message=msg)
        msg.body = data[body_start:]
        return msg
    if len(cl_values) > 1:
        raise ParseError("more than one Content-Length", message=msg)
    cl = cl_values[0]
    if not cl.isdigit() or len(cl) > 9:
        raise ParseError(f"bad Content-Length {cl[:20]!r}", message=msg)
    length = int(cl)
    if length > available:
        raise ParseError("Content-Length larger than the message", message=msg)
    msg.body = data[body_start: body_start + length]
    return msg


def parse_datagram(data: bytes) -> SipMessage | None:
    """Parse a UDP payload; None for keep-alives (CRLF only, RFC 5626 §4.4.1)."""
    if not data.strip(b"\r\n"):
        return None
    return parse_message(data)


class StreamFramer:
    """Cuts SIP messages out of a TCP byte stream by Content-Length (RFC 3261 §18.3).

    `feed()` returns parsed messages and ParseErrors in arrival order. After a framing error
    (no or bad Content-Length, a message over the size limit) the stream cannot be resynchronised:
    `broken` turns True and the transport should answer what it can and close the connection.
    """

    __slots__ = ("_buf", "broken", "max_message_bytes")

    def __init__(self, max_message_bytes: int = 65535) -> None:
        self._buf = bytearray()
        self.max_message_bytes = max_message_bytes
        self.broken = False

    def feed(self, data: bytes) -> list[SipMessage | ParseError]:
        out: list[SipMessage | ParseError] = []
        if self.broken:
            return out
        buf = self._buf
        buf += data
        while True:
            skip = 0
            while buf[skip: skip + 2] == b"\r\n":  # keep-alive CRLFs between messages
                skip += 2
            if skip:
                del buf[:skip]
            if not buf:
                break
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.max_message_bytes:
                    out.append(self._fail("header block larger than the message size limit"))
                break
            m = _CL_IN_HEAD.search(buf, 0, end + 2)
            if m is None or not m.group(1).isdigit() or len(m.group(1)) > 9:
                err = self._fail("missing or bad Content-Length on a stream transport")
                try:
                    parse_message(bytes(buf[: end + 4]), stream=True)
                except ParseError as exc:
                    err.message = exc.message
                out.append(err)
                break
            total = end + 4 + int(m.group(1))
            if total > self.max_message_bytes:
                out.append(self._fail("message larger than the size limit"))
                break
            if len(buf) < total:
                break
            chunk = bytes(buf[:total])
            del buf[:total]
            try:
                out.append(parse_message(chunk, stream=True))
            except ParseError as exc:
                out.append(exc)
        return out

    def _fail(self, reason: str) -> ParseError:
        self.broken = True
        self._buf.clear()
        return ParseError(reason)


def build_response(
    request: SipMessage,
    status: int,
    reason: str,
    *,
    to_tag: str | None = None,
    headers: list[tuple[str, str]] | tuple[()] = (),
    body: bytes = b"",
) -> SipMessage:
    """A response to `request` (RFC 3261 §8.2.6): Via, From, To (+tag), Call-ID, CSeq copied."""
    rows: list[tuple[str, bytes]] = []
    for name, row in request.rows:
        if name in ("via", "from", "call-id", "cseq"):
            rows.append((name, row))
        elif name == "to":
            if to_tag is not None and status > 100 and _lacks_tag(request):
                row = row.rstrip() + b";tag=" + to_tag.encode("latin-1")
            rows.append((name, row))
    for name, value in headers:
        rows.append((name.lower(), f"{display_name(name.lower())}: {value}".encode("latin-1")))
    rows.append(("content-length", b"Content-Length: %d" % len(body)))
    msg = SipMessage(b"SIP/2.0 %d %s" % (status, reason.encode("utf-8")), rows, body)
    msg.status = status
    msg.reason = reason
    return msg


def _lacks_tag(request: SipMessage) -> bool:
    try:
        return request.to.tag is None
    except ParseError:
        return False  # a To we cannot read is copied as it is
