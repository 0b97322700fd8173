"""Structured header values: name-addr / addr-spec, Via, CSeq (RFC 3261 §20, §25).

Each parser takes one header *value* (already unfolded: folds turned into single spaces) and raises
ParseError on bad syntax. Parsed objects keep the raw text they came from, and serialise back to
it unless something was changed.

Speed: the common shapes (`"disp" <sip:user@host:port;params>;tag=x`, `SIP/2.0/UDP h:p;branch=..`)
are recognised by one compiled regex each. Each piece of such a regex accepts a subset of the
matching piece of the general grammar, so a fast match is always valid and yields the same object
the general parser would; anything else falls through to the general code (tests and the fuzzer
check that both agree). Parameter lists are split only when someone reads them.
"""

from __future__ import annotations

import re
from typing import Final, Literal

from proxy.sip.errors import ParseError
from proxy.sip.uri import (
    FAST_HOST_PATTERN,
    FAST_URI_PARAMS_PATTERN,
    FAST_USER_PATTERN,
    PARAM_CHARS,
    USER_CHARS,
    OtherUri,
    SipUri,
    parse_uri,
    split_hostport,
)

_TOKEN_CLASS: Final = r"[A-Za-z0-9\-.!%*_+`'~]"
_TOKEN: Final = _TOKEN_CLASS + "+"
# qdtext (RFC 3261 §25.1): no control octets except HTAB; quoted-pair escapes any of 0x00-0x7f
# except CR and LF. Octets 0x80-0xff stand for UTF-8 (values are handled as latin-1).
_QDTEXT: Final = r'[^"\\\x00-\x08\x0a-\x1f\x7f]*'
_QUOTED: Final = rf'"{_QDTEXT}(?:\\[\x00-\x09\x0b\x0c\x0e-\x7f]{_QDTEXT})*"'
_QUOTED_RE: Final = re.compile(_QUOTED)
_LWS: Final = r"[ \t]"  # values are unfolded before parsing, so LWS is SP / HTAB only
_DISPLAY_TOKENS_PATTERN: Final = rf"{_TOKEN}(?:{_LWS}+{_TOKEN})*"
_DISPLAY_TOKENS: Final = re.compile(_DISPLAY_TOKENS_PATTERN)
_PARAM_VALUE: Final = rf"(?:{_TOKEN}|\[[0-9A-Fa-f:.]+\]|{_QUOTED})"
# ;name[=value] with LWS allowed around ';' and '='; value: token, host (IPv6 too) or quoted-string
_PARAM: Final = re.compile(rf"{_LWS}*;{_LWS}*({_TOKEN})(?:{_LWS}*={_LWS}*({_PARAM_VALUE}))?{_LWS}*")
# the same list without any LWS: findall splits it directly
_PARAMS_TIGHT: Final = re.compile(rf"(?:;{_TOKEN}(?:={_PARAM_VALUE})?)*")
_PARAM_TIGHT: Final = re.compile(rf";({_TOKEN})(?:=({_PARAM_VALUE}))?")
_CSEQ: Final = re.compile(rf"([0-9]{{1,10}}){_LWS}+({_TOKEN})")
# sent-protocol = protocol-name "/" protocol-version "/" transport, each a token (RFC 3261 §25.1)
_VIA: Final = re.compile(
    rf"({_TOKEN}){_LWS}*/{_LWS}*({_TOKEN}){_LWS}*/{_LWS}*({_TOKEN}){_LWS}+"
    rf"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)(?:{_LWS}*:{_LWS}*([0-9]{{1,5}}))?"
)
_URI_IN_ANGLES: Final = re.compile(r"[^\x00-\x20\x7f<>\"]+")
# Fast paths. Every piece accepts a subset of its general counterpart (no %-escapes, no quoted-
# pairs, no LWS inside the parameter list, parameter values are tokens), so a fast match is
# always valid and is split exactly as the general parser would split it.
_FAST_TOKEN: Final = r"[A-Za-z0-9\-.!%*_+`'~]++"
_FAST_PARAMS: Final = rf"(?:;{_FAST_TOKEN}(?:={_FAST_TOKEN})?)*"  # no `*+`: see uri.py
_FAST_SIP_URI: Final = (
    rf"(sips?):(?:({FAST_USER_PATTERN})@)?({FAST_HOST_PATTERN})(?::([0-9]{{1,5}}))?"
)
_VIA_FAST: Final = re.compile(
    rf"SIP/2\.0/({_FAST_TOKEN}) ({FAST_HOST_PATTERN})(?::([0-9]{{1,5}}))?({_FAST_PARAMS})"
)
# `"disp" <sip:user@host:port;uri-params>;params` or `disp <…>` or `<…>`
_NAME_ADDR_FAST: Final = re.compile(
    rf'(?:("[^"\\\x00-\x08\x0a-\x1f\x7f]*+")|({_TOKEN}(?: {_TOKEN})*))?[ \t]*+'
    rf"<{_FAST_SIP_URI}({FAST_URI_PARAMS_PATTERN})>({_FAST_PARAMS})"
)
# addr-spec `sip:user@host:port;params`: the first ';' starts the header parameters, and the URI
# can hold no ',', '?' or ';' at all (RFC 3261 §20), so the user part is narrower here
_ADDR_SPEC_FAST: Final = re.compile(
    rf"(sips?):(?:([A-Za-z0-9\-_.!~*'()&=+$/]++)@)?({FAST_HOST_PATTERN})(?::([0-9]{{1,5}}))?"
    rf"({_FAST_PARAMS})"
)
_UNESCAPE: Final = re.compile(r"\\(.)", re.DOTALL)

MAGIC_COOKIE: Final = "z9hG4bK"


# this module runs from its source (else it is the extension scripts/build-compiled made;
# the build is all or nothing, proxy/compiled.py, so this holds for every SIP module)
INTERPRETED: Final = __file__.endswith(".py")


def _ascii_table(char_class: str) -> bytes:
    """ASCII code → 1 for the characters a regex class (`[…]`) matches: the hand readings
    below check characters against the very classes the fast regexes use."""
    pattern = re.compile(char_class)
    return bytes(int(pattern.fullmatch(chr(c)) is not None) for c in range(128))


_TOKEN_TABLE: Final = _ascii_table(_TOKEN_CLASS)
_TOKEN_CHARS: Final = "".join(chr(c) for c in range(128) if _TOKEN_TABLE[c])  # for strip()
_HOST_TABLE: Final = _ascii_table(r"[A-Za-z0-9\-.]")  # FAST_HOST_PATTERN's name or IPv4
_DIGIT_TABLE: Final = _ascii_table(r"[0-9]")
_USER_TABLE: Final = _ascii_table(f"[{USER_CHARS}]")  # FAST_USER_PATTERN
_URI_PARAM_TABLE: Final = _ascii_table(f"[{PARAM_CHARS}]")  # FAST_URI_PARAMS_PATTERN


def _run_end(text: str, i: int, table: bytes) -> int:
    """Where the run of `table` characters starting at `i` ends."""
    n = len(text)
    while i < n:
        c = ord(text[i])
        if c >= 128 or not table[c]:
            break
        i += 1
    return i


def _all_in(text: str, table: bytes) -> bool:
    """Every character of `text` is ASCII and marked in `table`. Compiled, a loop over a few
    characters costs less than a regex or a method call (both calls by name there)."""
    return _run_end(text, 0, table) == len(text)


def _params_ok(text: str, table: bytes, empty_values: bool) -> bool:
    """`text` is `(;name[=value])*`, name and value characters marked in `table` (ASCII), a
    name never empty, a value empty only with `empty_values`: checked without splitting."""
    i, n = 0, len(text)
    while i < n:
        if text[i] != ";":
            return False
        i += 1
        end = _run_end(text, i, table)
        if end == i:
            return False
        i = end
        if i < n and text[i] == "=":
            end = _run_end(text, i + 1, table)
            if end == i + 1 and not empty_values:
                return False
            i = end
    return True


def _is_token(text: str) -> bool:
    if INTERPRETED:
        return bool(text) and not text.strip(_TOKEN_CHARS)
    return bool(text) and _all_in(text, _TOKEN_TABLE)


def _split_token_params(text: str) -> list[tuple[str, str | None]] | None:
    """`;a=1;b` whose names and values are all tokens, split by hand (two regex passes cost
    more); None for anything else (a quoted or [IPv6] value, LWS, a stray '=' or ';'): the
    regexes then accept or reject the whole list."""
    out: list[tuple[str, str | None]] = []
    for piece in text[1:].split(";"):
        name, eq, value = piece.partition("=")
        if not _is_token(name):
            return None
        if eq:
            if not _is_token(value):
                return None
            out.append((name, value))
        else:
            out.append((name, None))
    return out


def parse_params(text: str, where: str) -> list[tuple[str, str | None]]:
    """`;a=1;b` → [('a', '1'), ('b', None)]; names keep their case. Raises ParseError."""
    if not text:
        return []
    if text[0] == ";":
        out = _split_token_params(text)
        if out is not None:
            return out
    if _PARAMS_TIGHT.fullmatch(text):
        # a value is never empty, so '' from findall means "no value"
        return [(k, v or None) for k, v in _PARAM_TIGHT.findall(text)]
    return _parse_params_general(text, where)


def _parse_params_general(text: str, where: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    pos, end = 0, len(text)
    while pos < end:
        m = _PARAM.match(text, pos)
        if m is None:
            if text[pos:].strip(" \t") == "":
                break
            raise ParseError(f"bad parameter in {where}: {text[pos:pos + 40]!r}")
        out.append((m.group(1), m.group(2)))
        pos = m.end()
    return out


def find_param(params: list[tuple[str, str | None]], name: str) -> str | None:
    """Value of a parameter ('' for a flag), None when absent. Names compare case-insensitively."""
    name = name.lower()
    for key, value in params:
        if key.lower() == name:
            return "" if value is None else value
    return None


class NameAddr:
    """From / To / Contact / Route / Record-Route / P-Asserted-Identity value."""

    __slots__ = ("_params", "_raw", "display", "raw_params", "uri")

    def __init__(
        self,
        display: str | None,
        uri: SipUri | OtherUri,
        raw_params: str = "",
        params: list[tuple[str, str | None]] | None = None,
        raw: str | None = None,
    ) -> None:
        """`raw_params` must be a valid parameter list (`parse_params` checks one): with
        `params` None it is split on first use, not checked here (the parsers' fast paths
        hand over what their regex matched)."""
        self.display = display  # as written: quoted (with quotes) or token words; None if absent
        self.uri = uri
        self.raw_params = raw_params
        self._params: list[tuple[str, str | None]] | None = (
            params if params is not None or raw_params else [])
        self._raw = raw

    @property
    def params(self) -> list[tuple[str, str | None]]:
        """[(name, value or None)] in order; names keep their case."""
        params = self._params
        if params is None:
            params = self._params = parse_params(self.raw_params, "name-addr")
        return params

    @params.setter
    def params(self, value: list[tuple[str, str | None]]) -> None:
        self._params = value

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
            return _UNESCAPE.sub(r"\1", d[1:-1])
        return d

    def replace(
        self,
        *,
        uri: SipUri | OtherUri | None = None,
        display: str | Literal[False] | None = False,
        raw_params: str | None = None,
    ) -> NameAddr:
        """A copy with some parts changed (display=None drops it; False keeps it)."""
        new_display = self.display if display is False else display
        new_uri = self.uri if uri is None else uri
        if raw_params is not None:
            return NameAddr(new_display, new_uri, raw_params,
                            parse_params(raw_params, "name-addr"))  # validates what we are given
        return NameAddr(new_display, new_uri, self.raw_params, self._params)

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


def _host_port(hostport: str) -> tuple[str, int | None] | None:
    """`host[:port]` with a name or IPv4 host, as FAST_HOST_PATTERN and a 1-5 digit port in
    range read it; None for anything else."""
    colon = hostport.find(":")
    host = hostport if colon < 0 else hostport[:colon]
    if not host or not _all_in(host, _HOST_TABLE) or host[0] in "-." or host[-1] == "-":
        return None
    if colon < 0:
        return host, None
    digits = hostport[colon + 1:]
    if not 0 < len(digits) <= 5 or not _all_in(digits, _DIGIT_TABLE):
        return None
    port = int(digits)
    return (host, port) if 0 < port < 65536 else None


def _sip_uri_by_hand(s: str, scheme: str, at: int, end: int) -> SipUri | None:
    """`user@host:port;uri-params` in s[at:end] (after the scheme's colon), read by hand as
    the fast regexes read it; None when it is anything else."""
    user: str | None = None
    sign = s.find("@", at, end)
    if sign >= 0:
        user = s[at:sign]
        if not user or not _all_in(user, _USER_TABLE):
            return None
        at = sign + 1
    semi = s.find(";", at, end)
    found = _host_port(s[at:end if semi < 0 else semi])
    if found is None:
        return None
    uri_params = "" if semi < 0 else s[semi:end]
    if not _params_ok(uri_params, _URI_PARAM_TABLE, True):
        return None
    return SipUri(scheme, user, found[0], found[1], uri_params)


def uri_by_hand(s: str) -> SipUri | None:
    """The usual SIP URI, `sip:user@host:port;params` without escapes, password or headers
    (a Request-URI, say), read without a regex; None for anything else, which `parse_uri`
    then reads or refuses. Accepts a subset of what its fast regex accepts, read the same way."""
    if s.startswith("sip:"):
        return _sip_uri_by_hand(s, "sip", 4, len(s))
    if s.startswith("sips:"):
        return _sip_uri_by_hand(s, "sips", 5, len(s))
    return None


def parse_request_uri(text: str) -> SipUri | OtherUri:
    """`parse_uri`, the usual shape read by hand first when compiled (see `uri_by_hand`)."""
    if not INTERPRETED:  # interpreted, the regex is the faster way
        uri = uri_by_hand(text)
        if uri is not None:
            return uri
    return parse_uri(text)


def name_addr_by_hand(s: str) -> NameAddr | None:
    """The usual name-addr, `<sip:user@host:port;uri-params>;token-params` without a display
    name or escapes, read without a regex; None for anything else, which the regexes then read
    or refuse. Accepts a subset of what `_NAME_ADDR_FAST` accepts, and reads it the same way."""
    if s.startswith("<sip:"):
        scheme, at = "sip", 5
    elif s.startswith("<sips:"):
        scheme, at = "sips", 6
    else:
        return None
    gt = s.find(">", at)
    if gt < 0:
        return None
    uri = _sip_uri_by_hand(s, scheme, at, gt)
    raw_params = s[gt + 1:]
    if uri is None or not _params_ok(raw_params, _TOKEN_TABLE, False):
        return None
    # the header parameters are split when read (most name-addrs are never asked for them)
    return NameAddr(None, uri, raw_params, None, s)


# Parsed name-addrs by their text. A dialog's messages repeat their From, To, Route and Contact
# values: a lookup by the text (whose parse is a pure function of it) costs a few hundred
# instructions against several thousand for the parse. (Via values are not kept: each request
# carries a branch of its own, and a response's branch is read by `SipMessage.top_branch`.)
# The objects are never changed after parsing (editing makes new ones: `replace`, `with_user`),
# so one object may serve many messages. Bounded: a value longer than _PARSED_MAX_TEXT is not
# kept, and the table starts over when full (a few hundred entries serve a worker's calls in
# progress; nothing a sender does grows it).
_PARSED_MAX_ENTRIES = 4096
_PARSED_MAX_TEXT: Final = 256
_name_addrs: Final[dict[str, NameAddr]] = {}


def put_bounded(table: dict, key: object, value: object, limit: int) -> None:
    """`table[key] = value`, the table cleared first when it holds `limit` entries: bounded, so
    hostile or huge traffic only costs the table's hits (the proxy's memories of what it has
    already parsed, opened or mapped)."""
    if len(table) >= limit:
        table.clear()
    table[key] = value


def parse_name_addr(value: str, where: str = "header") -> NameAddr:
    """Parse `"Display" <uri>;params`, `Display <uri>;params` or `uri;params` (addr-spec)."""
    known = _name_addrs.get(value)
    if known is not None:
        return known
    addr = _parse_name_addr(value, where)
    if len(value) <= _PARSED_MAX_TEXT:
        put_bounded(_name_addrs, value, addr, _PARSED_MAX_ENTRIES)
    return addr


def _parse_name_addr(value: str, where: str) -> NameAddr:
    s = value.strip(" \t")
    if not INTERPRETED:  # interpreted, the regex is the faster way
        addr = name_addr_by_hand(s)
        if addr is not None:
            return addr
    m = _NAME_ADDR_FAST.fullmatch(s)
    if m is not None:
        quoted, tokens, scheme, user, host, port, uri_params, params = m.groups()
        if port is None:
            return NameAddr(quoted or tokens, SipUri(scheme, user, host, None, uri_params),
                            params, None, s)
        if 0 < int(port) < 65536:
            return NameAddr(quoted or tokens, SipUri(scheme, user, host, int(port), uri_params),
                            params, None, s)
    elif s[:3] == "sip":
        m = _ADDR_SPEC_FAST.fullmatch(s)
        if m is not None:
            scheme, user, host, port, params = m.groups()
            if port is None:
                return NameAddr(None, SipUri(scheme, user, host, None, ""), params, None, s)
            if 0 < int(port) < 65536:
                return NameAddr(None, SipUri(scheme, user, host, int(port), ""), params, None, s)
    return _parse_name_addr_general(s, where)


def _parse_name_addr_general(s: str, where: str) -> NameAddr:
    if not s:
        raise ParseError(f"empty {where}")
    display: str | None = None
    if s[0] == '"':
        m = _QUOTED_RE.match(s)
        if m is None:
            raise ParseError(f"unterminated or bad quoted display name in {where}")
        display = m.group(0)
        rest = s[m.end():].lstrip(" \t")
        if not rest.startswith("<"):
            raise ParseError(f"quoted display name without <uri> in {where}")
    else:
        lt = s.find("<")
        if lt < 0:
            return _parse_addr_spec(s, where)
        if lt > 0:
            display = s[:lt].strip(" \t")
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
    uri_text, raw_params = (s, "") if semi < 0 else (s[:semi].rstrip(" \t"), s[semi:])
    # RFC 3261 §20: a URI with a comma, question mark or semicolon needs the name-addr form
    if not uri_text or any(c in uri_text for c in ' ,?"<>\t'):
        raise ParseError(f"bad addr-spec in {where}: {uri_text[:60]!r}")
    uri = parse_uri(uri_text)
    return NameAddr(None, uri, raw_params, parse_params(raw_params, where), s)


class Via:
    """One Via value: `SIP/2.0/UDP host:port;branch=…;rport`."""

    __slots__ = ("_params", "_raw", "host", "port", "protocol", "raw_params", "transport")

    def __init__(
        self,
        transport: str,
        host: str,
        port: int | None,
        params: list[tuple[str, str | None]] | None,
        raw: str | None = None,
        protocol: str = "SIP/2.0",
        raw_params: str = "",
    ) -> None:
        self.transport = transport.upper()
        self.host = host
        self.port = port
        # params None: raw_params (already matched by a fast-path regex) is split on first use
        if params is None and not raw_params:
            params = []
        self._params: list[tuple[str, str | None]] | None = params
        self.raw_params = raw_params
        self._raw = raw
        # "SIP/2.0"; another version is legal Via syntax (RFC 4475 badvers)
        self.protocol = protocol

    @property
    def params(self) -> list[tuple[str, str | None]]:
        params = self._params
        if params is None:
            params = self._params = parse_params(self.raw_params, "Via")
        return params

    @params.setter
    def params(self, value: list[tuple[str, str | None]]) -> None:
        self._params = value

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

    def param(self, name: str) -> str | None:
        return find_param(self.params, name)

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
        return host.strip("[]"), self.port or (5061 if self.transport == "TLS" else 5060)

    def __str__(self) -> str:
        if self._raw is not None:
            return self._raw
        params = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self.params)
        return f"{self.protocol}/{self.transport} {self.sent_by}{params}"

    def __repr__(self) -> str:
        return f"Via({str(self)!r})"


def parse_via(value: str) -> Via:
    """Parse one Via value (LWS around '/' and ':' allowed, RFC 3261 §25)."""
    s = value.strip(" \t")
    if not INTERPRETED:  # interpreted, the regex is the faster way
        via = via_by_hand(s)
        if via is not None:
            return via
    m = _VIA_FAST.fullmatch(s)
    if m is not None:
        transport, host, port, params = m.groups()
        if port is None:
            return Via(transport, host, None, None, s, "SIP/2.0", params)
        if 0 < int(port) < 65536:
            return Via(transport, host, int(port), None, s, "SIP/2.0", params)
    return _parse_via_general(s)


def via_by_hand(s: str) -> Via | None:
    """The usual Via, `SIP/2.0/UDP host[:port][;token params]` (host a name or IPv4 address),
    read without a regex; None for anything else, which the regexes then read or refuse.
    Accepts a subset of what `_VIA_FAST` accepts, and reads it the same way."""
    if not s.startswith("SIP/2.0/"):
        return None
    sp = s.find(" ", 8)
    if sp < 0:
        return None
    transport = s[8:sp]
    if not _is_token(transport):
        return None
    semi = s.find(";", sp)
    found = _host_port(s[sp + 1:len(s) if semi < 0 else semi])
    if found is None:
        return None
    host, port = found
    if semi < 0:
        return Via(transport, host, port, [], s, "SIP/2.0", "")
    params = _split_token_params(s[semi:])
    if params is None:
        return None
    return Via(transport, host, port, params, s, "SIP/2.0", s[semi:])


def _parse_via_general(s: str) -> Via:
    m = _VIA.match(s)
    if m is None:
        raise ParseError(f"bad Via: {s[:60]!r}")
    host, _ = split_hostport(m.group(4))
    if host is None:
        raise ParseError(f"bad Via host: {m.group(4)[:60]!r}")
    port_number = int(m.group(5)) if m.group(5) else None
    if port_number is not None and not 0 < port_number < 65536:
        raise ParseError(f"bad Via port: {port_number}")
    raw_params = s[m.end():]
    params = parse_params(raw_params, "Via")
    return Via(m.group(3), host, port_number, params, s, f"{m.group(1).upper()}/{m.group(2)}",
               raw_params)


def cseq_by_hand(s: str) -> tuple[int, str] | None:
    """The usual `314159 INVITE` read without a regex; None for anything else (LWS other than
    one space, a number too long), which the regex then reads or refuses."""
    number, space, method = s.partition(" ")
    if space and 0 < len(number) <= 10 and _all_in(number, _DIGIT_TABLE) and _is_token(method):
        return int(number), method
    return None


def parse_cseq(value: str) -> tuple[int, str]:
    """`CSeq: 4711 INVITE` → (4711, 'INVITE'); the number must fit 32 bits (RFC 3261 §8.1.1.5)."""
    s = value.strip(" \t")
    found = None if INTERPRETED else cseq_by_hand(s)  # interpreted, the regex is faster
    if found is None:
        m = _CSEQ.fullmatch(s)
        if m is None:
            raise ParseError(f"bad CSeq: {value.strip()[:60]!r}")
        found = int(m.group(1)), m.group(2)
    if found[0] > 0xFFFFFFFF:
        raise ParseError("CSeq number larger than 2**32-1")
    return found


def split_list(value: str) -> list[str]:
    """Split a comma-joined header row into values, ignoring commas in quotes and <>."""
    if "," not in value:
        return [value.strip(" \t")]
    return [value[a:b].strip(" \t") for a, b in _list_spans(value)]


def _list_spans(value: str) -> list[tuple[int, int]]:
    """(start, end) of each comma-separated element of a header row."""
    n = len(value)
    if "," not in value:  # most rows: one element, no walk over the characters
        return [(0, n)]
    out: list[tuple[int, int]] = []
    start = 0
    if '"' not in value and "<" not in value:  # every comma separates
        while True:
            i = value.find(",", start)
            if i < 0:
                out.append((start, n))
                return out
            out.append((start, i))
            start = i + 1
    return _walk_spans(value)


def _walk_spans(value: str) -> list[tuple[int, int]]:
    """`_list_spans` the long way: a walk over each character, minding quotes and <…>."""
    out: list[tuple[int, int]] = []
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
            out.append((start, i))
            start = i + 1
        i += 1
    out.append((start, n))
    return out
