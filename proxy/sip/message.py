"""SIP messages: lazy parsing, byte-range edits, serialisation (RFC 3261 §7, §18.3, §20, §25).

Parsing splits the start line and the header rows once; a header's structure is parsed only when
someone asks for it (and then cached). Each row keeps its original bytes, so what the proxy does
not touch goes out exactly as it came in. Structured values are handled as latin-1 text, which maps
bytes 1:1 and so round-trips any octet (UTF-8 display names included).
"""

from __future__ import annotations

import re
from typing import Any, Final

from proxy.sip.address import (
    INTERPRETED,
    NameAddr,
    Via,
    _is_token,
    _list_spans,
    parse_cseq,
    parse_name_addr,
    parse_request_uri,
    parse_via,
    split_list,
)
from proxy.sip.errors import ParseError
from proxy.sip.uri import OtherUri, SipUri

# RFC 3261 §7.3.3 plus the compact forms registered since (RFC 3515, 3841, 3892, 4028, 4474, 6665)
COMPACT_FORMS: Final = {
    "i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length",
    "c": "content-type", "f": "from", "s": "subject", "k": "supported", "t": "to", "v": "via",
    "o": "event", "r": "refer-to", "b": "referred-by", "u": "allow-events",
    "x": "session-expires", "y": "identity", "a": "accept-contact", "j": "reject-contact",
    "d": "request-disposition", "n": "identity-info",
}
# Headers whose rows may hold several comma-separated values (RFC 3261 §7.3.1). Others (Date,
# WWW-Authenticate, …) contain commas inside a single value and are never split.
LIST_HEADERS: Final = frozenset({
    "via", "route", "record-route", "contact", "allow", "supported", "require", "proxy-require",
    "unsupported", "accept", "accept-encoding", "accept-language", "allow-events",
    "content-encoding", "content-language", "in-reply-to", "history-info", "diversion",
    "p-asserted-identity", "p-preferred-identity", "path", "service-route", "reason", "privacy",
    "warning", "alert-info", "call-info", "error-info",
})
SINGLE_HEADERS: Final = ("from", "to", "call-id", "cseq", "max-forwards", "content-length")
CANONICAL_NAMES: Final = {
    "via": "Via", "from": "From", "to": "To", "call-id": "Call-ID", "cseq": "CSeq",
    "contact": "Contact", "content-length": "Content-Length", "content-type": "Content-Type",
    "max-forwards": "Max-Forwards", "route": "Route", "record-route": "Record-Route",
    "p-asserted-identity": "P-Asserted-Identity", "www-authenticate": "WWW-Authenticate",
    "rseq": "RSeq", "rack": "RAck", "mime-version": "MIME-Version", "sip-etag": "SIP-ETag",
    "sip-if-match": "SIP-If-Match",
}
KNOWN_METHODS: Final = frozenset({
    "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "UPDATE", "INFO",
    "REFER", "SUBSCRIBE", "NOTIFY", "MESSAGE", "PUBLISH",
})

_KNOWN_METHOD_BYTES: Final = {m.encode("ascii"): m for m in KNOWN_METHODS}
_TOKEN_BYTES: Final = re.compile(rb"[A-Za-z0-9\-.!%*_+`'~]+")
_FOLD: Final = re.compile(r"\r\n[ \t]+")
# every Content-Length row of a header block (a row starts after a CRLF; continuation lines
# start with SP/HTAB, so they never match); the value runs to the end of its line, folds allowed
# before it; a value continued on the next line is not matched (the framer then gives up)
_CL_IN_HEAD: Final = re.compile(
    rb"(?i)\r\n(?:content-length|l)[ \t]*:((?:[ \t]|\r\n[ \t])*[^\r\n]*+)(?!\r\n[ \t])"
)
# header names as written on the wire (b"Via", b"v", b"Content-Length  ") → canonical names;
# parse_message's fast path needs every row's name in here, the slow path fills it
_NAME_CACHE: Final[dict[bytes, str]] = {}
_NAME_CACHE_MAX_ENTRIES: Final = 4096
_NAME_CACHE_MAX_LENGTH: Final = 64  # hostile peers must not fill memory with long distinct names


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
    if len(_NAME_CACHE) < _NAME_CACHE_MAX_ENTRIES and len(raw) <= _NAME_CACHE_MAX_LENGTH:
        _NAME_CACHE[raw] = name
    return name


def display_name(name: str) -> str:
    """How we write a header name we add: `call-id` → `Call-ID`."""
    return CANONICAL_NAMES.get(name) or "-".join(p.capitalize() for p in name.split("-"))


_KEYS: Final[dict[str, str]] = {}


def header_key(name: str) -> str:
    """The key rows are stored under: lower-case long form (`From`, `f`, `FROM` → `from`)."""
    key = _KEYS.get(name)
    if key is None:
        lower = name.lower()
        key = COMPACT_FORMS.get(lower, lower) if len(lower) == 1 else lower
        if len(_KEYS) < 1024:
            _KEYS[name] = key
    return key


def colon_at(row: bytes) -> int:
    """Where the first ':' of a header row is, -1 without one.

    Compiled, a loop over the name's bytes, not `find`: indexing bytes is a C primitive there,
    while `find` or `partition` is a method call by name, which costs more than walking a
    header name (a few bytes, and the name comes first). Interpreted, `find` is the fast one.
    """
    if INTERPRETED:
        return row.find(b":")
    for i in range(len(row)):
        if row[i] == 58:  # ':'
            return i
    return -1


def _row_value(row: bytes) -> str:
    value = row[colon_at(row) + 1:].decode("latin-1")
    if "\n" in value:
        value = _FOLD.sub(" ", value)
    return value.strip(" \t")


def _plain_number(row: bytes) -> int:
    """The value of a `Name: 123` row (1 to 9 ASCII digits, blanks around them); -1 for any
    other value (folded, empty, too long, not digits), which the caller reads the long way.

    Compiled, read by hand: indexing bytes is a C primitive there, while `strip` and `isdigit`
    are method calls by name, each costing more than this whole loop.
    """
    if INTERPRETED:
        value = row[row.find(b":") + 1:].strip(b" \t")
        return int(value) if 0 < len(value) <= 9 and value.isdigit() else -1
    n = len(row)
    i = colon_at(row) + 1
    if i == 0:
        return -1
    while i < n and (row[i] == 32 or row[i] == 9):
        i += 1
    start = i
    number = 0
    while i < n and 48 <= row[i] <= 57:
        number = number * 10 + row[i] - 48
        i += 1
    if not 0 < i - start <= 9:
        return -1
    while i < n and (row[i] == 32 or row[i] == 9):
        i += 1
    return number if i == n else -1


def _is_ascii_number(text: str | bytes, max_digits: int) -> bool:
    # str.isdigit() alone accepts '²' (latin-1 0xB2), which int() refuses
    return 0 < len(text) <= max_digits and text.isascii() and text.isdigit()


class SipMessage:
    """A request or a response. Build with `parse_message`; edit; `serialize()` to bytes.

    Header names in the methods below may be given in any case and in compact form (`f`, `From`,
    `from`); `rows` stores them as lower-case long forms.
    """

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
            uri = self._cache["@uri"] = parse_request_uri(self.uri_text)
        return uri

    def set_uri(self, uri: SipUri | OtherUri | str) -> None:
        """Replace the Request-URI (RFC 3261 §16.6 step 6); requests only."""
        if not self.is_request:
            raise ValueError("a response has no Request-URI")
        text = str(uri)
        if not text or any(c in text for c in " \t\r\n"):
            raise ValueError(f"not a Request-URI: {text[:60]!r}")
        self.uri_text = text
        self.forget_parsed("@uri")
        self._start = f"{self.method} {text} SIP/2.0".encode("latin-1")

    def set_reason(self, reason: str) -> None:
        """Replace a response's reason phrase; responses only."""
        if self.is_request:
            raise ValueError("a request has no reason phrase")
        if any(c in reason for c in "\r\n"):
            raise ValueError("CR or LF in a reason phrase")
        self.reason = reason
        self._start = b"SIP/2.0 %d %s" % (self.status, reason.encode("utf-8"))

    @property
    def start_line(self) -> bytes:
        return self._start

    # ---- reading headers -----------------------------------------------------------
    def has(self, name: str) -> bool:
        key = header_key(name)
        return any(n == key for n, _ in self.rows)

    def count(self, name: str) -> int:
        key = header_key(name)
        return sum(1 for n, _ in self.rows if n == key)

    def header(self, name: str) -> str | None:
        """The first row's value of a header (unfolded, stripped), None when absent."""
        key = header_key(name)
        for n, row in self.rows:
            if n == key:
                return _row_value(row)
        return None

    def raw_values(self, name: str) -> list[str]:
        """Each row's value of a header (unfolded, stripped), list headers not split."""
        key = header_key(name)
        return [_row_value(row) for n, row in self.rows if n == key]

    def rows_of(self, keys: frozenset[str]) -> dict[str, list[str]]:
        """`raw_values` of several headers (canonical keys: "to", "record-route") in one
        pass over the rows; a header that is absent has no entry."""
        out: dict[str, list[str]] = {}
        for n, row in self.rows:
            if n in keys:
                found = out.get(n)
                if found is None:
                    out[n] = [_row_value(row)]
                else:
                    found.append(_row_value(row))
        return out

    def header_values(self, name: str) -> list[str]:
        """Every value of a header, over all its rows; list headers split on their commas."""
        key = header_key(name)
        out: list[str] = []
        split = key in LIST_HEADERS
        for n, row in self.rows:
            if n == key:
                value = _row_value(row)
                if split:
                    out.extend(v for v in split_list(value) if v)
                else:
                    out.append(value)
        return out

    def _first_value(self, key: str) -> str:
        """The value of the first `key` row (the parsers below read one row each)."""
        for n, row in self.rows:
            if n == key:
                return _row_value(row)
        raise ParseError(f"missing {display_name(key)} header", message=self)

    # Each property calls its parser by name rather than through one generic helper taking
    # the parser as an argument: compiled, that is a direct C call instead of a call through
    # a Python object (argument tuple, wrapper, type checks) on every message.
    @property
    def from_(self) -> NameAddr:
        cache = self._cache
        if "from" in cache:
            return cache["from"]
        result = cache["from"] = _parse_from(self._first_value("from"))
        return result

    @property
    def to(self) -> NameAddr:
        cache = self._cache
        if "to" in cache:
            return cache["to"]
        result = cache["to"] = _parse_to(self._first_value("to"))
        return result

    @property
    def call_id(self) -> str:
        cache = self._cache
        if "call-id" in cache:
            return cache["call-id"]
        result = cache["call-id"] = _check_call_id(self._first_value("call-id"))
        return result

    @property
    def cseq(self) -> tuple[int, str]:
        cache = self._cache
        if "cseq" in cache:
            return cache["cseq"]
        result = cache["cseq"] = parse_cseq(self._first_value("cseq"))
        return result

    @property
    def top_via(self) -> Via:
        via = self._cache.get("@via")
        if via is None:
            for n, row in self.rows:
                if n == "via":
                    value = _row_value(row)
                    if "," in value:
                        value = next((v for v in split_list(value) if v), "")
                    if value:
                        via = self._cache["@via"] = parse_via(value)
                        return via
            raise ParseError("missing Via header", message=self)
        return via

    def top_branch(self) -> str | None:
        """The top Via's branch, read off its row when the row is plain: no quoted string and
        no fold (so the first comma ends the top value), and in that value `branch` written
        once, as `;branch=` in any case, with a token value. Anything else: from `top_via`.

        For a response, whose top Via is the one the proxy wrote: the branch is all it needs
        of that value before it removes it.
        """
        via = self._cache.get("@via")
        if via is None:
            for n, row in self.rows:
                if n == "via":
                    text = row.decode("latin-1")
                    if '"' not in text and "\n" not in text:
                        comma = text.find(",")
                        low = (text if comma < 0 else text[:comma]).lower()
                        i = low.find(";branch=")
                        if i > 0 and low.find("branch") == i + 1 and low.find("branch", i + 8) < 0:
                            end = low.find(";", i + 8)
                            value = text[i + 8:len(low) if end < 0 else end].strip(" \t")
                            if _is_token(value):
                                return value
                    break
            via = self.top_via
        return via.branch

    @property
    def vias(self) -> list[Via]:
        """Every Via value, top first, parsed."""
        return [parse_via(v) for v in self.header_values("via")]

    @property
    def max_forwards(self) -> int | None:
        """Max-Forwards (0-255), None when absent; read once (a request's is asked for by
        validate, by §16.3's check and when the proxy decrements it)."""
        cache = self._cache
        if "max-forwards" in cache:
            return cache["max-forwards"]
        number: int | None = None
        for n, row in self.rows:
            if n == "max-forwards":
                number = _plain_number(row)  # the usual `Max-Forwards: 70`, read by hand
                if not 0 <= number <= 99999:
                    value = _row_value(row)
                    number = int(value) if _is_ascii_number(value, 5) else 256
                if number > 255:
                    raise ParseError(f"bad Max-Forwards {_row_value(row)[:20]!r}",
                                     message=self)
                break
        cache["max-forwards"] = number
        return number

    @property
    def content_length(self) -> int | None:
        """The Content-Length header's number, None when absent (RFC 2543 UDP messages)."""
        value = self.header("content-length")
        if value is None:
            return None
        if not _is_ascii_number(value, 9):
            raise ParseError(f"bad Content-Length {value[:20]!r}", message=self)
        return int(value)

    def name_addrs(self, name: str) -> list[NameAddr]:
        """Every value of a name-addr header (Contact, Route, Record-Route, PAI …), parsed."""
        key = header_key(name)
        label = display_name(key)
        return [parse_name_addr(v, label) for v in self.header_values(key)]

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
        present: set[str] = set()
        for name, _row in self.rows:  # one pass: the names there, and no single header twice
            if name in present:
                if name in _SINGLE_SET:
                    raise ParseError(f"more than one {display_name(name)} header")
            else:
                present.add(name)
        if self.is_request:
            for name in ("via", "from", "to", "call-id", "cseq"):
                if name not in present:
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
            if "contact" in present:
                values = self.header_values("contact")
                if values != ["*"]:
                    for value in values:
                        parse_name_addr(value, "Contact")
        else:
            if "via" not in present or "cseq" not in present:
                raise ParseError("response without Via or CSeq")
            self.cseq  # noqa: B018
        self.from_  # noqa: B018
        self.to  # noqa: B018
        self.call_id  # noqa: B018
        self.top_via  # noqa: B018

    # ---- editing -------------------------------------------------------------------
    def forget_parsed(self, name: str) -> None:
        """Drop the cached parse of a header whose rows were edited directly in `rows`."""
        cache = self._cache
        if cache:  # `in` and `del`: compiled, dict.pop is a method call by name
            if name in cache:
                del cache[name]
            if name == "via" and "@via" in cache:
                del cache["@via"]

    def set_header(self, name: str, value: str) -> None:
        """Replace a header (first row keeps its place, other rows go); append if absent."""
        name = header_key(name)
        row = _new_row(name, value)
        rows = self.rows
        self.forget_parsed(name)
        first, more = -1, False
        for i, (n, _row) in enumerate(rows):
            if n == name:
                if first >= 0:
                    more = True
                    break
                first = i
        if first < 0:
            rows.append((name, row))
            return
        rows[first] = (name, row)
        if more:
            rows[first + 1:] = [r for r in rows[first + 1:] if r[0] != name]

    def set_header_values(self, name: str, values: list[str]) -> None:
        """Replace a header by one row per value (removing it when the list is empty)."""
        name = header_key(name)
        if not values:
            self.remove_header(name)
            return
        new_rows = [(name, _new_row(name, v)) for v in values]
        rows = self.rows
        self.forget_parsed(name)
        first = next((i for i, (n, _) in enumerate(rows) if n == name), len(rows))
        self.rows = rows = [r for r in rows if r[0] != name]
        rows[first:first] = new_rows

    def remove_header(self, name: str) -> int:
        """Drop every row of a header; returns how many rows went."""
        name = header_key(name)
        before = len(self.rows)
        self.rows = [r for r in self.rows if r[0] != name]
        self.forget_parsed(name)
        return before - len(self.rows)

    def insert_header(self, name: str, value: str, index: int = 0) -> None:
        """Add a row at `index` in the header list (0: before every other header)."""
        name = header_key(name)
        self.forget_parsed(name)
        self.rows.insert(index, (name, _new_row(name, value)))

    def push_via(self, value: str) -> None:
        """Add our Via on top (RFC 3261 §16.6 step 8)."""
        self.forget_parsed("via")
        self.rows.insert(0, ("via", _new_row("via", value)))

    def pop_via(self) -> str:
        """Remove the top Via value (RFC 3261 §16.7 step 3); returns it.

        In a comma-joined row the other values keep their bytes.
        """
        rows = self.rows
        for i, (n, row) in enumerate(rows):
            if n != "via":
                continue
            colon = colon_at(row) + 1
            joined = _plain_joined_via(row, colon)
            if joined is not None:
                top_bytes, tail = joined
                self.forget_parsed("via")
                rows[i] = ("via", row[:colon] + b" " + tail)
                return top_bytes.decode("latin-1")
            text = row[colon:].decode("latin-1")  # str: its methods are C calls compiled
            if "," not in text:  # the usual case: one value per Via row
                if not text.strip(" \t\r\n"):
                    continue  # an empty row holds no Via
                self.forget_parsed("via")
                del rows[i]
                return (_FOLD.sub(" ", text) if "\n" in text else text).strip(" \t")
            spans = [(a, b) for a, b in _list_spans(text) if text[a:b].strip(_LWS_CRLF)]
            if not spans:
                continue  # a row of empty values holds no Via
            self.forget_parsed("via")
            a, b = spans[0]
            top = _FOLD.sub(" ", text[a:b]).strip(" \t")
            if len(spans) == 1:
                del rows[i]
            else:
                rest = text[spans[1][0]:].lstrip(_LWS_CRLF)
                rows[i] = ("via", row[:colon] + b" " + rest.encode("latin-1"))
            return top
        raise ParseError("no Via to remove")

    def via_after_top(self) -> bool:
        """True when a Via value surely follows the top one: a second Via row, or a first row
        holding two plain values. False says only that pop_via must be asked."""
        first = b""
        for n, row in self.rows:
            if n == "via":
                if first:
                    return True
                first = row
        return bool(first) and _plain_joined_via(first, colon_at(first) + 1) is not None

    def prepend_record_route(self, value: str) -> None:
        """Add our Record-Route on top of the list (RFC 3261 §16.6 step 4)."""
        rows = self.rows
        index = next((i for i, (n, _) in enumerate(rows) if n == "record-route"), None)
        if index is None:
            index = next((i for i, (n, _) in enumerate(rows) if n != "via"), len(rows))
        rows.insert(index, ("record-route", _new_row("record-route", value)))

    def set_body(self, body: bytes) -> None:
        """Replace the body; Content-Length follows."""
        self.body = body
        self.set_header("content-length", str(len(body)))

    # ---- output ----------------------------------------------------------------------
    def serialize(self) -> bytes:
        """Wire bytes. A message that came without Content-Length (UDP, RFC 2543) gets one."""
        rows = self.rows
        raw = [row for _, row in rows]
        for name, _ in reversed(rows):  # Content-Length is usually the last row
            if name == "content-length":
                return b"\r\n".join((self._start, *raw, b"", self.body))
        cl = b"Content-Length: %d" % len(self.body)
        return b"\r\n".join((self._start, *raw, cl, b"", self.body))

    def copy(self) -> SipMessage:
        """An independent copy for a second outgoing version (rows are shared immutable bytes)."""
        other = SipMessage(self._start, list(self.rows), self.body)
        other.method, other.uri_text = self.method, self.uri_text
        other.status, other.reason = self.status, self.reason
        other._cache = dict(self._cache)
        return other

    def __repr__(self) -> str:
        return f"SipMessage({self._start[:80]!r})"


_LWS_CRLF: Final = " \t\r\n"
_SINGLE_SET: Final = frozenset(SINGLE_HEADERS)


_ROW_PREFIXES: Final[dict[str, bytes]] = {}


def _plain_joined_via(row: bytes, colon: int) -> tuple[bytes, bytes] | None:
    """A Via row's top value and the rest, when values are joined in one row as many UAs
    answer and the row is plain (no quoted string, no fold, the first comma ends the top
    value, a value on each side of it); None for any other row."""
    comma = row.find(b",", colon)
    if comma > 0 and row.find(b'"', colon) < 0 and row.find(b"\n", colon) < 0:
        top = row[colon:comma].strip(b" \t")
        tail = row[comma + 1:].lstrip(b" \t")
        if top and tail and tail[0] != 44:  # not ", ," (an empty value)
            return top, tail
    return None


def _new_row(name: str, value: str) -> bytes:
    """A header row we write. CR and LF in a value would smuggle in extra header rows."""
    if "\r" in value or "\n" in value:
        raise ValueError(f"CR or LF in a {display_name(name)} value")
    prefix = _ROW_PREFIXES.get(name)
    if prefix is None:
        prefix = f"{display_name(name)}: ".encode("latin-1")
        if len(_ROW_PREFIXES) < 1024:
            _ROW_PREFIXES[name] = prefix
    return prefix + value.encode("latin-1")


def _parse_from(value: str) -> NameAddr:
    return parse_name_addr(value, "From")


def _parse_to(value: str) -> NameAddr:
    return parse_name_addr(value, "To")


def _check_call_id(value: str) -> str:
    # RFC 3261 §25.1 word chars are stricter; real equipment sends '=' and more, so only
    # whitespace and control octets (log and header injection) are refused
    if not value or not value.isprintable() or " " in value:
        raise ParseError(f"bad Call-ID {value[:40]!r}")
    return value


def _split_rows(lines: list[bytes]) -> list[tuple[str, bytes]]:
    """Header rows with their names; folded continuation lines join the row above."""
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
    if len(start) >= 12 and start[11] == 32 and start[:8] == b"SIP/2.0 ":
        # the usual status line, `SIP/2.0 180 Ringing`: its code read by hand (compiled,
        # indexing bytes is a C primitive; split, isdigit and int are calls by name)
        hundreds, tens, units = start[8] - 48, start[9] - 48, start[10] - 48
        if 1 <= hundreds <= 6 and 0 <= tens <= 9 and 0 <= units <= 9:
            msg.status = hundreds * 100 + tens * 10 + units
            msg.reason = start[12:].decode("latin-1")
            return
    parts = start.split(b" ")
    if len(parts) == 3 and parts[2] == b"SIP/2.0" and parts[1]:
        method = _KNOWN_METHOD_BYTES.get(parts[0])
        if method is not None:
            msg.method = method
            msg.uri_text = parts[1].decode("latin-1")
            return
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
    if len(parts) != 3 or not all(parts):
        raise ParseError("bad request line (exactly one SP between method, URI and version)")
    method_bytes, uri, version = parts
    if not _TOKEN_BYTES.fullmatch(method_bytes):
        raise ParseError(f"bad method {method_bytes[:20]!r}")
    msg.method = method_bytes.decode("ascii")
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
    lines = head.split(b"\r\n")
    start = lines[0]
    # a CR or LF that is not part of a CRLF would reach the next hop inside a row we forward
    # byte for byte, where a lenient parser may take it for a line end (header smuggling).
    # Joined without the CRLFs, any CR (13) or LF (10) left is one; `int in bytes` is a memchr.
    joined = b"".join(lines)
    clean = 13 not in joined and 10 not in joined
    del lines[0]
    msg = SipMessage(start, [], b"")
    try:
        _parse_start(msg, start)
    except ParseError as exc:
        # keep the rows when they are readable, so a bad request line can still be answered
        if not start.startswith(b"SIP/"):
            msg.method = start.split(b" ", 1)[0].decode("latin-1")
            try:
                readable = _split_rows(lines)
                msg.rows = readable if clean else [r for r in readable if _no_stray_cr_lf(r[1])]
                exc.message = msg
            except ParseError:
                pass
        raise exc from None
    rows: list[tuple[str, bytes]] | None = None
    if clean:
        # fast path: every row starts with a header name seen before (no folds, no odd names)
        names = _NAME_CACHE
        rows = []
        for line in lines:
            colon = colon_at(line)
            name = names.get(line[:colon]) if colon > 0 else None
            if name is None:  # no ':' (a fold, say) or a name not seen yet
                rows = None
                break
            rows.append((name, line))
    if rows is None:
        rows = _split_rows(lines)
    if not clean:
        # answerable only from the rows that are sound; a response must not echo a stray CR/LF
        msg.rows = [r for r in rows if _no_stray_cr_lf(r[1])]
        raise ParseError("CR or LF outside a line end in the header block", message=msg)
    msg.rows = rows
    cl_rows = [row for name, row in rows if name == "content-length"]
    if not cl_rows:
        if stream:
            raise ParseError("missing Content-Length on a stream transport", message=msg)
        msg.body = data[body_start:]
        return msg
    if len(cl_rows) > 1:
        raise ParseError("more than one Content-Length", message=msg)
    row = cl_rows[0]
    length = _plain_number(row)
    if length < 0:
        value = _row_value(row)  # folded or bad
        if not _is_ascii_number(value, 9):
            raise ParseError(f"bad Content-Length {value[:20]!r}", message=msg)
        length = int(value)
    if length > len(data) - body_start:
        raise ParseError("Content-Length larger than the message", message=msg)
    msg.body = data[body_start: body_start + length]
    return msg


def _no_stray_cr_lf(row: bytes) -> bool:
    return row.count(b"\r") == row.count(b"\n") == row.count(b"\r\n")


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
    CRLF keep-alives between messages (RFC 5626 §4.4.1) are skipped.
    """

    __slots__ = ("_buf", "_need", "_scanned", "broken", "max_message_bytes")

    def __init__(self, max_message_bytes: int = 65535) -> None:
        self._buf = bytearray()
        self._scanned = 0  # how far the search for the empty line has got in _buf
        self._need = 0  # total size of the message at the front of _buf, once its head is known
        self.max_message_bytes = max_message_bytes
        self.broken = False

    def feed(self, data: bytes) -> list[SipMessage | ParseError]:
        out: list[SipMessage | ParseError] = []
        if self.broken:
            return out
        buf = self._buf
        buf += data
        while True:
            need = self._need
            if need:
                if len(buf) < need:
                    break
                chunk = bytes(buf[:need])
                del buf[:need]
                self._need = 0
                try:
                    out.append(parse_message(chunk, stream=True))
                except ParseError as exc:
                    out.append(exc)
                continue
            skip = 0
            while buf.startswith(b"\r\n", skip):
                skip += 2
            if skip:
                del buf[:skip]
                self._scanned = 0
            if not buf:
                break
            # resume where the last search stopped, so byte-by-byte input stays linear
            end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
            if end < 0:
                self._scanned = len(buf)
                if len(buf) > self.max_message_bytes:
                    out.append(self._fail("header block larger than the message size limit"))
                break
            self._scanned = 0
            if end + 4 > self.max_message_bytes:  # the same verdict as before the end arrived
                out.append(self._fail("header block larger than the message size limit"))
                break
            values = _CL_IN_HEAD.findall(buf, 0, end + 2)
            value = values[0].strip(b" \t\r\n") if len(values) == 1 else b""
            if not (value.isdigit() and len(value) <= 9):  # bytearray.isdigit: ASCII only
                head = bytes(buf[: end + 4])
                out.append(self._fail("missing, repeated or bad Content-Length on a stream", head))
                break
            total = end + 4 + int(value)
            if total > self.max_message_bytes:
                out.append(self._fail("message larger than the size limit", bytes(buf[: end + 4])))
                break
            self._need = total
        return out

    def _fail(self, reason: str, head: bytes | None = None) -> ParseError:
        """Give up on the stream; keep what the head says, so the request can be answered."""
        error = ParseError(reason)
        if head is not None:
            try:
                error.message = parse_message(head)
            except ParseError as exc:
                error.message = exc.message
        self.broken = True
        self._buf.clear()
        self._need = self._scanned = 0
        return error


def build_response(
    request: SipMessage,
    status: int,
    reason: str,
    *,
    to_tag: str | None = None,
    headers: list[tuple[str, str]] | tuple[()] = (),
    body: bytes = b"",
) -> SipMessage:
    """A response to `request` (RFC 3261 §8.2.6): Via, From, To (+tag), Call-ID, CSeq copied.

    The copied rows keep their bytes. `headers` are (name, value) rows to add.
    """
    if not 100 <= status <= 699:
        raise ValueError(f"status {status} out of range")
    if any(c in reason for c in "\r\n") or (to_tag and any(c in to_tag for c in "\r\n;")):
        raise ValueError("CR, LF or ';' in a reason phrase or tag")
    rows: list[tuple[str, bytes]] = []
    for name, row in request.rows:
        if name in ("via", "from", "call-id", "cseq"):
            rows.append((name, row))
        elif name == "to":
            if to_tag is not None and status > 100 and _lacks_tag(request):
                row = row.rstrip() + b";tag=" + to_tag.encode("latin-1")
            rows.append((name, row))
    for name, value in headers:
        key = header_key(name)
        rows.append((key, _new_row(key, value)))
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
