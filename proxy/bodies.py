"""Message bodies on their way to the other side: scrub what we can read, drop what we cannot.

The privacy rewrite's text scan only works on bodies whose bytes are text. A gzip body, a base64
part or a binary ISUP message carries the number in a form no substring search finds, so such a
body is either removed or, by policy, the request refused. SIP-I ISUP bodies can instead be
rewritten field by field (proxy.isup). Multipart bodies (RFC 2046 §5.1, RFC 5621) are taken
apart and each part judged on its own. Sans-IO.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, NamedTuple

from proxy.isup import IsupError, rewrite_isup_counted
from proxy.sip.message import SipMessage

Scrub = Callable[[bytes], tuple[bytes, int]]
"""Replaces the hidden number in readable text; returns (new bytes, occurrences replaced)."""

UNREADABLE_POLICIES: Final = ("strip", "reject")
ISUP_POLICIES: Final = ("strip", "rewrite")

# media types whose bytes are text a substring scan can read (RFC 4566 SDP, RFC 3420 sipfrag,
# the DTMF INFO bodies); text/* and application/*+xml (RFC 7303) are matched by shape below
_READABLE_TYPES: Final = frozenset({
    "application/sdp", "application/xml", "application/json", "application/dtmf-relay",
    "application/dtmf", "message/sipfrag",
})
ISUP_TYPE: Final = "application/isup"
# charsets in which an ASCII digit is not one ASCII octet (RFC 2781, RFC 2152 does keep digits)
_WIDE_CHARSETS: Final = ("utf-16", "utf16", "utf-32", "utf32", "ucs-2", "ucs2", "ucs-4", "ucs4",
                  "iso-10646-ucs", "unicode")
# RFC 2045 §6.1: these transfer encodings leave the octets as they are
_IDENTITY_TRANSFER: Final = frozenset({"7bit", "8bit", "binary"})
# multipart inside multipart inside …: deep enough for SIP-I and RFC 5621, bounded for hostile input
MAX_MULTIPART_DEPTH: Final = 3

# RFC 2045 §5.1 token and the Content-Type parameter grammar (quoted-string per RFC 822)
_TOKEN: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_MEDIA_TYPE: Final = re.compile(rf"[ \t]*({_TOKEN})[ \t]*/[ \t]*({_TOKEN})[ \t]*")
_PARAM: Final = re.compile(
    rf';[ \t]*({_TOKEN})[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^;"\s]+))[ \t]*', re.DOTALL
)
_TRAILING_SEMI: Final = re.compile(r";[ \t]*")
_QUOTED_PAIR: Final = re.compile(r"\\(.)", re.DOTALL)
# RFC 2046 §5.1.1 boundary: 1-70 bchars, not ending in a space
_BOUNDARY: Final = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_FOLD: Final = re.compile(rb"\r\n[ \t]+")


class BodyRefused(Exception):
    """The body cannot be read and the policy is reject."""


class _Policy(NamedTuple):
    scrub: Scrub
    x: str
    unreadable: str
    isup: str


def make_body_safe(
    msg: SipMessage,
    scrub: Scrub,
    *,
    x: str,
    unreadable: str = "strip",
    isup: str = "strip",
) -> int:
    """Make msg's body safe for the receiving side; returns how many occurrences were replaced
    (+ parts/bodies removed count as 1 each).

    Readable text is passed through `scrub`; an `application/isup` body is removed
    (isup="strip") or has its party numbers set to `x` (isup="rewrite", removed when it does not
    parse); a body or a multipart part that cannot be read (content-coded, transfer-encoded,
    unknown or missing type, malformed multipart) is removed (unreadable="strip") or raises
    BodyRefused (unreadable="reject"; the caller answers a request, a response cannot be
    refused). A removed body takes Content-Type, Content-Encoding and Content-Disposition with it.
    """
    body = msg.body
    if not body:
        return 0
    if unreadable not in UNREADABLE_POLICIES or isup not in ISUP_POLICIES:
        raise ValueError(f"unknown body policy {unreadable!r}/{isup!r}")
    # fast path: one plain SDP body, the case of nearly every INVITE and 200
    ctype_row: bytes | None = None
    simple = True
    for name, row in msg.rows:
        if name == "content-type":
            if ctype_row is not None:
                simple = False  # two types: the receiver may read the other one
            ctype_row = row
        elif name == "content-encoding" or name == "content-transfer-encoding":
            simple = False
    if simple and ctype_row is not None:
        value = ctype_row[ctype_row.find(b":") + 1:].split(b";", 1)[0]
        if value.strip(b" \t\r\n").lower() == b"application/sdp":
            new, count = scrub(body)
            if new is not body and new != body:
                msg.set_body(new)
            return count
    return _make_safe_slow(msg, _Policy(scrub, x, unreadable, isup))


def _make_safe_slow(msg: SipMessage, policy: _Policy) -> int:
    body = msg.body
    ctypes = msg.header_values("content-type")
    ctype = ctypes[0] if len(ctypes) == 1 else None
    coding = _coding(
        msg.header_values("content-encoding"), msg.header_values("content-transfer-encoding")
    )
    if len(ctypes) > 1:
        new, count = _unreadable(policy, "more than one Content-Type")
    else:
        new, count = _treat(ctype, coding, body, policy, 0, "body")
    if new is None:
        msg.set_body(b"")
        for name in ("content-type", "content-encoding", "content-disposition"):
            msg.remove_header(name)
        return count + 1
    if new != body:
        msg.set_body(new)
    if ctype is not None and _is_multipart(ctype):
        # a boundary that happens to hold the number was replaced in the rebuilt body
        # (see _multipart); the header must say the same
        scrubbed, n = policy.scrub(ctype.encode("latin-1"))
        if n:
            msg.set_header("content-type", scrubbed.decode("latin-1"))
            count += n
    return count


def _coding(encodings: list[str], transfers: list[str]) -> str | None:
    """Why the octets are not the content itself (RFC 3261 §20.12, RFC 2045 §6), or None."""
    for value in encodings:
        if value.strip().lower() != "identity":
            return f"Content-Encoding {value[:30]}"
    for value in transfers:
        if value.strip().lower() not in _IDENTITY_TRANSFER:
            return f"Content-Transfer-Encoding {value[:30]}"
    return None


def _unreadable(policy: _Policy, reason: str) -> tuple[None, int]:
    """The verdict on something we cannot read: (None, 0) (drop it) or BodyRefused."""
    if policy.unreadable == "reject":
        raise BodyRefused(reason)
    return None, 0


def _treat(
    ctype: str | None, coding: str | None, content: bytes, policy: _Policy, depth: int, where: str
) -> tuple[bytes | None, int]:
    """One body or part: (new content or None when it goes, occurrences replaced).

    A removal is counted by the caller (1 per part or body), so it is counted once.
    """
    if ctype is None:
        # RFC 3261 §20.15: a body must say what it is; what we cannot name we cannot read
        return _unreadable(policy, f"{where}: no Content-Type")
    parsed = parse_content_type(ctype)
    if parsed is None:
        return _unreadable(policy, f"{where}: malformed Content-Type {ctype[:60]!r}")
    mtype, params = parsed
    if mtype == ISUP_TYPE:
        # ISUP never refuses a call: the SDP carries the session, the ISUP is a courtesy
        # (Q.1912.5; Content-Disposition handling=optional is the norm)
        if policy.isup == "strip" or coding is not None:
            return None, 0
        try:
            return rewrite_isup_counted(content, policy.x)
        except IsupError:
            return None, 0
    if coding is not None:
        return _unreadable(policy, f"{where}: {coding}")
    if _is_readable(mtype):
        charset = params.get("charset", "").lower()
        if charset.startswith(_WIDE_CHARSETS):
            return _unreadable(policy, f"{where}: charset {charset[:30]}")
        return policy.scrub(content)
    if mtype.startswith("multipart/"):
        if depth >= MAX_MULTIPART_DEPTH:
            return _unreadable(policy, f"{where}: multipart nested too deep")
        return _multipart(content, params.get("boundary"), policy, depth, where)
    return _unreadable(policy, f"{where}: unreadable type {mtype[:60]}")


def _is_readable(mtype: str) -> bool:
    return mtype in _READABLE_TYPES or mtype.startswith("text/") or (
        mtype.startswith("application/") and mtype.endswith("+xml")
    )


def _is_multipart(ctype: str) -> bool:
    return ctype.lstrip(" \t")[:10].lower() == "multipart/"


def parse_content_type(value: str) -> tuple[str, dict[str, str]] | None:
    """`type/subtype` in lower case and its parameters (names lower-cased, quoted values
    unquoted), or None when malformed (RFC 2045 §5.1, RFC 3261 §20.15). A repeated parameter is
    malformed: two boundaries would let us and the receiver read different parts."""
    match = _MEDIA_TYPE.match(value)
    if match is None:
        return None
    mtype = f"{match[1]}/{match[2]}".lower()
    params: dict[str, str] = {}
    pos = match.end()
    size = len(value)
    while pos < size:
        param = _PARAM.match(value, pos)
        if param is None:
            tail = _TRAILING_SEMI.fullmatch(value, pos)
            return (mtype, params) if tail is not None else None
        name = param[1].lower()
        if name in params:
            return None
        quoted = param[2]
        params[name] = _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else param[3]
        pos = param.end()
    return mtype, params


# ---- multipart (RFC 2046 §5.1.1) -----------------------------------------------------------------

class _Part(NamedTuple):
    rows: list[tuple[str, bytes]]  # (lower-case name, raw row, folds kept)
    content: bytes


def split_multipart(body: bytes, boundary: str) -> tuple[list[bytes], bool] | None:
    """The body parts between the delimiters, and whether anything but line ends surrounds them
    (preamble, epilogue); None when there is no opening or no closing delimiter.

    A delimiter line is CRLF "--" boundary, then transport padding (spaces, tabs) and CRLF, or
    "--" for the close delimiter; the first may open the body without the CRLF. A line that only
    starts like a delimiter is content.
    """
    dash = b"--" + boundary.encode("latin-1")
    parts: list[bytes] = []
    start = _delimiter(body, dash, 0, first=True)
    if start is None:
        return None
    line_start, pos, close = start
    extra = bool(body[:line_start].strip(b"\r\n"))
    while not close:
        found = _delimiter(body, dash, pos, first=False)
        if found is None:
            return None
        line_start, next_pos, close = found
        parts.append(body[pos:line_start])
        pos = next_pos
    extra = extra or bool(body[pos:].strip(b"\r\n"))
    return parts, extra


def _delimiter(body: bytes, dash: bytes, pos: int, *, first: bool) -> tuple[int, int, bool] | None:
    """(where the delimiter line starts, where the next part starts, is it the close one)."""
    if first and body.startswith(dash):
        found = _delimiter_end(body, len(dash))
        if found is not None:
            return 0, *found
    search = pos
    while True:
        hit = body.find(b"\r\n" + dash, search)
        if hit < 0:
            return None
        found = _delimiter_end(body, hit + 2 + len(dash))
        if found is not None:
            return hit, *found
        search = hit + 2


def _delimiter_end(body: bytes, after: int) -> tuple[int, bool] | None:
    """After "--boundary": ("--") transport padding CRLF (or the end, for the close one)."""
    close = body.startswith(b"--", after)
    cursor = after + 2 if close else after
    size = len(body)
    while cursor < size and body[cursor] in (32, 9):  # transport padding: SP, HTAB
        cursor += 1
    if body.startswith(b"\r\n", cursor):
        return cursor + 2, close
    if close and cursor == size:
        return cursor, close
    return None


def _parse_part(raw: bytes) -> _Part | None:
    """A body part's MIME headers and content (RFC 2046 §5.1.1 body-part); None if malformed."""
    if raw.startswith(b"\r\n"):
        return _Part([], raw[2:])  # no headers: a blank line opens the content
    end = raw.find(b"\r\n\r\n")
    head, content = (raw, b"") if end < 0 else (raw[:end], raw[end + 4:])
    rows: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not rows:
                return None
            name, prev = rows[-1]
            rows[-1] = (name, prev + b"\r\n" + line)
            continue
        colon = line.find(b":")
        if colon <= 0:
            return None
        name = line[:colon].strip(b" \t").decode("latin-1").lower()
        rows.append((name, line))
    return _Part(rows, content)


def _part_value(rows: list[tuple[str, bytes]], name: str) -> list[str]:
    out = []
    for n, row in rows:
        if n == name:
            value = _FOLD.sub(b" ", row.partition(b":")[2])
            out.append(value.decode("latin-1").strip(" \t"))
    return out


def _multipart(
    content: bytes, boundary: str | None, policy: _Policy, depth: int, where: str
) -> tuple[bytes | None, int]:
    if boundary is None or not _BOUNDARY.fullmatch(boundary):
        return _unreadable(policy, f"{where}: multipart without a valid boundary")
    split = split_multipart(content, boundary)
    if split is None:
        return _unreadable(policy, f"{where}: multipart without its delimiters")
    raw_parts, changed = split
    # rebuilt delimiters must not carry the number either: a boundary holding it is replaced
    # here, and the header naming the boundary is scrubbed by whoever holds that header (the
    # enclosing part's rows, or _make_safe_slow for the message's Content-Type)
    raw_boundary = boundary.encode("latin-1")
    new_boundary, hits = policy.scrub(raw_boundary)
    if hits or new_boundary != raw_boundary:
        changed = True
    count = 0
    kept: list[bytes] = []
    for index, raw in enumerate(raw_parts, 1):
        label = f"{where} part {index}"
        part = _parse_part(raw)
        if part is None:
            new_content, n = _unreadable(policy, f"{label}: malformed headers")
        else:
            ctypes = _part_value(part.rows, "content-type")
            coding = _coding(
                [v for value in _part_value(part.rows, "content-encoding")
                 for v in value.split(",") if v.strip()],
                _part_value(part.rows, "content-transfer-encoding"),
            )
            if len(ctypes) > 1:
                new_content, n = _unreadable(policy, f"{label}: more than one Content-Type")
            else:
                new_content, n = _treat(
                    ctypes[0] if ctypes else None, coding, part.content, policy, depth + 1, label
                )
        if new_content is None or part is None:
            count += 1
            changed = True
            continue
        count += n
        rows = part.rows
        if new_content != part.content:
            changed = True
            rows = [
                (name, b"Content-Length: %d" % len(new_content))
                if name == "content-length" else (name, row)
                for name, row in rows
            ]
        if rows:
            head = b"\r\n".join(row for _, row in rows)
            new_head, n = policy.scrub(head)
            if n or new_head != head:
                changed = True
            count += n
            kept.append(new_head + b"\r\n\r\n" + new_content)
        else:
            kept.append(b"\r\n" + new_content)
    if not kept:
        return None, count
    if not changed:
        return content, count
    dash = b"--" + new_boundary
    out = b"".join(dash + b"\r\n" + part + b"\r\n" for part in kept) + dash + b"--\r\n"
    return out, count
