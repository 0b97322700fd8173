"""Structured header values: name-addr / addr-spec, Via, CSeq (RFC 3261 §20, §25).

Each parser takes one header *value* (already unfolded: folds turned into single spaces) and raises
ParseError on bad syntax. Parsed objects keep the raw text they came from, and serialise back to
it unless something was changed.
"""

from __future__ import annotations

import re

from proxy.sip.errors import ParseError
from proxy.sip.uri import OtherUri, SipUri, parse_uri, split_hostport

_TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
_TOKEN_RE = re.compile(_TOKEN)
_QUOTED = r'"(?:[^"\\\r\n]|\\[\x00-\x09\x0b\x0c\x0e-\x7f])*"'
_QUOTED_RE = re.compile(_QUOTED)
_DISPLAY_TOKENS = re.compile(rf"{_TOKEN}(?:\s+{_TOKEN})*")
# ;name[=value] with LWS allowed around ';' and '='; value: token, host (IPv6 too) or quoted-string
_PARAM = re.compile(
    rf"\s*;\s*({_TOKEN})(?:\s*=\s*({_TOKEN}|\[[0-9A-Fa-f:.]+\]|{_QUOTED}))?\s*"
)
_CSEQ = re.compile(rf"(\d{{1,10}})\s+({_TOKEN})")
_VIA = re.compile(
    rf"SIP\s*/\s*2\.0\s*/\s*({_TOKEN})\s+(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)(?:\s*:\s*(\d{{1,5}}))?"
)
_URI_IN_ANGLES = re.compile(r"[^\s<>\"]+")

MAGIC_COOKIE = "z9hG4bK"


def parse_params(text: str, where: str) -> list[tuple[str, str | None]]:
    """`;a=1;b` → [('a', '1'), ('b', None)]; names keep their case. Raises ParseError."""
    out: list[tuple[str, str | None]] = []
    pos, end = 0, len(text)
    while pos < end:
        m = _PARAM.match(text, pos)
        if m is None:
            if text[pos:].strip() == "":
                break
            raise ParseError(f"bad parameter in {where}: {text[pos:pos + 40]!r}")
        out.append((m.group(1), m.group(2)))
        pos = m.end()
    return out


def find_param(params: list[tuple[str, str | None]], name: str) -> str | None:
    """Value of a parameter ('' for a flag), None when absent. Names compare case-insensitively."""
    for key, value in params:
        if key.lower() == name:
            return "" if value is None else value
    return None


class NameAddr:
    """From / To / Contact / Route / Record-Route / P-Asserted-Identity value."""

    __slots__ = ("_raw", "display", "params", "raw_params", "uri")

    def __init__(
        self,
        display: str | None,
        uri: SipUri | OtherUri,
        raw_params: str = "",
        params: list[tuple[str, str | None]] | None = None,
        raw: str | None = None,
    ) -> None:
        self.display = display  # as written: quoted (with quotes) or token words; None if absent
        self.uri = uri
        self.raw_params = raw_params
        self.params = params if params is not None else parse_params(raw_params, "name-addr")
        self._raw = raw

    @property
    def tag(self) -> str | None:
        return find_param(self.params, "tag")

    def param(self, name: str) -> str | None:
        return find_param(self.params, name)

    @property
    def display_text(self) -> str | None:
        """The display name without quotes and escapes."""
        d = self.display
        if d is None:
            return None
        if d.startswith('"'):
            return re.sub(r"\\(.)", r"\1", d[1:-1])
        return d

    def replace(
        self,
        *,
        uri: SipUri | OtherUri | None = None,
        display: str | bool | None = False,
        raw_params: str | None = None,
    ) -> NameAddr:
        """A copy with some parts changed (display=None drops it; False keeps it)."""
        return NameAddr(
            self.display if display is False else display,  # type: ignore[arg-type]
            self.uri if uri is None else uri,
            self.raw_params if raw_params is None else raw_params,
            None if raw_params is not None else self.params,
        )

    def with_tag(self, tag: str) -> NameAddr:
        kept = "".join(
            f";{k}" if v is None else f";{k}={v}" for k, v in self.params if k.lower() != "tag"
        )
        return self.replace(raw_params=f"{kept};tag={tag}")

    def __str__(self) -> str:
        if self._raw is not None:
            return self._raw
        uri = f"<{self.uri}>"
        head = uri if self.display is None else f"{self.display} {uri}"
        return head + self.raw_params

    def __repr__(self) -> str:
        return f"NameAddr({str(self)!r})"


def quote_display(text: str) -> str:
    """A display name as a quoted-string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_name_addr(value: str, where: str = "header") -> NameAddr:
    """Parse `"Display" <uri>;params`, `Display <uri>;params` or `uri;params` (addr-spec)."""
    s = value.strip()
    if not s:
        raise ParseError(f"empty {where}")
    display: str | None = None
    if s[0] == '"':
        m = _QUOTED_RE.match(s)
        if m is None:
            raise ParseError(f"unterminated quoted display name in {where}")
        display = m.group(0)
        rest = s[m.end():].lstrip()
        if not rest.startswith("<"):
            raise ParseError(f"quoted display name without <uri> in {where}")
    else:
        lt = s.find("<")
        if lt < 0:
            return _parse_addr_spec(s, where)
        if lt > 0:
            display = s[:lt].strip()
            if not _DISPLAY_TOKENS.fullmatch(display):
                raise ParseError(f"display name in {where} must be quoted: {display[:40]!r}")
        rest = s[lt:]
    gt = rest.find(">")
    if gt < 0:
        raise ParseError(f"missing '>' in {where}")
    inner = rest[1:gt]
    if not _URI_IN_ANGLES.fullmatch(inner):
        raise ParseError(f"bad URI inside <> in {where}: {inner[:60]!r}")
    uri = parse_uri(inner)
    raw_params = rest[gt + 1:]
    params = parse_params(raw_params, where)
    return NameAddr(display, uri, raw_params, params, s)


def _parse_addr_spec(s: str, where: str) -> NameAddr:
    semi = s.find(";")
    uri_text, raw_params = (s, "") if semi < 0 else (s[:semi].rstrip(), s[semi:])
    # RFC 3261 §20: a URI with a comma, question mark or semicolon needs the name-addr form
    if not uri_text or any(c in uri_text for c in ' ,?"<>\t'):
        raise ParseError(f"bad addr-spec in {where}: {uri_text[:60]!r}")
    uri = parse_uri(uri_text)
    return NameAddr(None, uri, raw_params, parse_params(raw_params, where), s)


class Via:
    """One Via value: `SIP/2.0/UDP host:port;branch=…;rport`."""

    __slots__ = ("_raw", "host", "params", "port", "transport")

    def __init__(
        self,
        transport: str,
        host: str,
        port: int | None,
        params: list[tuple[str, str | None]],
        raw: str | None = None,
    ) -> None:
        self.transport = transport.upper()
        self.host = host
        self.port = port
        self.params = params
        self._raw = raw

    @property
    def branch(self) -> str | None:
        return find_param(self.params, "branch")

    @property
    def received(self) -> str | None:
        return find_param(self.params, "received")

    @property
    def rport(self) -> str | None:
        """'' when the client asked for rport (RFC 3581), the port once filled, None if absent."""
        return find_param(self.params, "rport")

    @property
    def maddr(self) -> str | None:
        return find_param(self.params, "maddr")

    @property
    def sent_by(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def has_magic_cookie(self) -> bool:
        b = self.branch
        return b is not None and b.startswith(MAGIC_COOKIE) and len(b) > len(MAGIC_COOKIE)

    def response_address(self, source: tuple[str, int]) -> tuple[str, int]:
        """Where responses go (RFC 3261 §18.2.2 with RFC 3581 rport)."""
        rport = self.rport
        if rport is not None:
            return source  # we stamp received/rport from the source anyway
        host = self.received or self.host
        return host.strip("[]"), self.port or 5060

    def __str__(self) -> str:
        if self._raw is not None:
            return self._raw
        params = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self.params)
        return f"SIP/2.0/{self.transport} {self.sent_by}{params}"


def parse_via(value: str) -> Via:
    """Parse one Via value (LWS around '/' and ':' allowed, RFC 3261 §25)."""
    s = value.strip()
    m = _VIA.match(s)
    if m is None:
        raise ParseError(f"bad Via: {s[:60]!r}")
    host, _ = split_hostport(m.group(2))
    if host is None:
        raise ParseError(f"bad Via host: {m.group(2)[:60]!r}")
    port = int(m.group(3)) if m.group(3) else None
    if port is not None and not 0 < port < 65536:
        raise ParseError(f"bad Via port: {port}")
    params = parse_params(s[m.end():], "Via")
    return Via(m.group(1), host, port, params, s)


def parse_cseq(value: str) -> tuple[int, str]:
    """`CSeq: 4711 INVITE` → (4711, 'INVITE'); the number must fit 32 bits (RFC 3261 §8.1.1.5)."""
    m = _CSEQ.fullmatch(value.strip())
    if m is None:
        raise ParseError(f"bad CSeq: {value.strip()[:60]!r}")
    num = int(m.group(1))
    if num > 0xFFFFFFFF:
        raise ParseError("CSeq number larger than 2**32-1")
    return num, m.group(2)


def split_list(value: str) -> list[str]:
    """Split a comma-joined header row into values, ignoring commas in quotes and <>."""
    if "," not in value:
        return [value.strip()]
    out: list[str] = []
    start = 0
    quoted = angle = False
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "<":
            angle = True
        elif c == ">":
            angle = False
        elif c == "," and not angle:
            out.append(value[start:i].strip())
            start = i + 1
        i += 1
    out.append(value[start:].strip())
    return out
