"""SIP, SIPS and tel URIs (RFC 3261 §19.1, §25.1; RFC 3966).

Components are kept as the raw text that came in, so an unchanged URI serialises back exactly;
`%`-escapes are decoded only on request (`user_unescaped`).
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote_to_bytes

from proxy.sip.errors import ParseError

_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
# The grammar pieces are kept as pattern text too, so address.py can build its one-regex fast
# paths from exactly the same pieces (a fast path must never accept what these reject).
HOST_PATTERN: Final = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9\-.]*[A-Za-z0-9.])?)"
_ESCAPE: Final = "%[0-9A-Fa-f]{2}"


def _escaped_run(chars: str, *, at_least_one: bool) -> str:
    """`(?:[chars]|%HH)*` written so that sre runs it as tight single-class loops.

    Each `%HH` starts a new group, so the pattern stays unambiguous (no nested-quantifier
    backtracking on input that fails to match).
    """
    body = f"[{chars}]*(?:{_ESCAPE}[{chars}]*)*"
    return f"(?:[{chars}]|{_ESCAPE}){body}" if at_least_one else body


# user / password / param / header characters (RFC 3261 §25.1): unreserved, escaped and the
# per-part extras. No whitespace, no angle brackets, no quotes.
_UNRESERVED: Final = r"A-Za-z0-9\-_.!~*'()"
USER_CHARS: Final = _UNRESERVED + r"&=+$,;?/"  # a regex class body, as PARAM_CHARS
USER_PATTERN: Final = _escaped_run(USER_CHARS, at_least_one=True)
PARAM_CHARS: Final = _UNRESERVED + r"\[\]/:&+$"
URI_PARAMS_PATTERN: Final = (rf"(?:;{_escaped_run(PARAM_CHARS, at_least_one=True)}"
                      rf"(?:={_escaped_run(PARAM_CHARS, at_least_one=False)})?)*")
_HOST: Final = re.compile(HOST_PATTERN)
_USER: Final = re.compile(USER_PATTERN)
_PASSWORD: Final = re.compile(_escaped_run(_UNRESERVED + r"&=+$,", at_least_one=False))
_PARAM: Final = re.compile(URI_PARAMS_PATTERN)
_HEADERS: Final = re.compile(_escaped_run(_UNRESERVED + r"\[\]/?:+$=&", at_least_one=False))
_TEL: Final = re.compile(r"[0-9A-Fa-f*#+\-.()pPwW]+")
# anything a URI of another scheme may hold: no LWS or control octets, no <>, no quotes
_ABSOLUTE: Final = re.compile(r"[^\x00-\x20\x7f<>\"]+")
# Fast-path pieces: each one accepts a subset of the matching general piece above (no
# %-escapes), so a fast match is always a valid URI and splits it the same way. They use
# possessive quantifiers (no backtracking state, faster in sre); that cannot change what they
# match because the character after each run is never one the run could take.
FAST_HOST_PATTERN: Final = r"(?:\[[0-9A-Fa-f:.]++\]|[A-Za-z0-9][A-Za-z0-9\-.]*+(?<!-))"
FAST_USER_PATTERN: Final = rf"[{USER_CHARS}]++"
# A possessive repeat of a group (`(...)*+`) is not used: CPython 3.11.2's sre (Debian 12's
# python3, the one .venv runs) lets it end inside an iteration, so `sip:0;` matched with an
# empty parameter; every iteration starts with ';', so the plain `*` backtracks no further.
FAST_URI_PARAMS_PATTERN: Final = rf"(?:;[{PARAM_CHARS}]++(?:=[{PARAM_CHARS}]*+)?)*"
# the common `sip:user@host:port;params` shape in one step; no password, no ?headers
_SIP_FAST: Final = re.compile(
    rf"(sips?):(?:({FAST_USER_PATTERN})@)?({FAST_HOST_PATTERN})(?::([0-9]{{1,5}}))?"
    rf"({FAST_URI_PARAMS_PATTERN})"
)

KNOWN_SCHEMES: Final = frozenset({"sip", "sips", "tel"})


class SipUri:
    """A parsed URI. `scheme` is lower-case; other parts keep their original text."""

    __slots__ = ("headers", "host", "params", "password", "port", "scheme", "user")

    def __init__(
        self,
        scheme: str,
        user: str | None = None,
        host: str = "",
        port: int | None = None,
        params: str = "",
        headers: str = "",
        password: str | None = None,
    ) -> None:
        self.scheme = scheme
        self.user = user
        self.password = password
        self.host = host
        self.port = port
        self.params = params  # raw, with leading ';' on each: ";lr;transport=tcp"
        self.headers = headers  # raw, without the '?'

    # ---- reading -------------------------------------------------------------
    def param(self, name: str) -> str | None:
        """Value of a URI parameter ('' for a flag such as `lr`), None if absent."""
        return _lookup_param(self.params, name)

    def has_param(self, name: str) -> bool:
        return _lookup_param(self.params, name) is not None

    @property
    def user_unescaped(self) -> str | None:
        """The user part with %-escapes decoded (%00 stays a NUL, it does not end the string)."""
        if self.user is None:
            return None
        if "%" not in self.user:
            return self.user
        return unquote_to_bytes(self.user).decode("latin-1")

    @property
    def hostport(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    # ---- editing -------------------------------------------------------------
    def with_user(self, user: str | None) -> SipUri:
        return SipUri(self.scheme, user, self.host, self.port, self.params, self.headers, None)

    def without_param(self, name: str) -> SipUri:
        return SipUri(self.scheme, self.user, self.host, self.port,
                      _drop_param(self.params, name), self.headers, self.password)

    def __str__(self) -> str:
        if self.scheme == "tel":
            return f"tel:{self.user}{self.params}"
        user = self.user
        if user is None:
            userinfo = ""
        elif self.password is None:
            userinfo = f"{user}@"
        else:
            userinfo = f"{user}:{self.password}@"
        port = "" if self.port is None else f":{self.port}"
        headers = f"?{self.headers}" if self.headers else ""
        return f"{self.scheme}:{userinfo}{self.host}{port}{self.params}{headers}"

    def __repr__(self) -> str:
        return f"SipUri({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SipUri) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


class OtherUri:
    """A URI of a scheme we do not route (`http:`, `im:`, …): kept as text."""

    __slots__ = ("scheme", "text")

    def __init__(self, scheme: str, text: str) -> None:
        self.scheme = scheme
        self.text = text

    user = None
    host = ""
    port = None
    params = ""

    def param(self, name: str) -> str | None:
        return None

    def __str__(self) -> str:
        return self.text


def parse_uri(text: str) -> SipUri | OtherUri:
    """Parse an absolute URI; SIP/SIPS/tel fully, others as opaque text. Raises ParseError."""
    m = _SIP_FAST.fullmatch(text)
    if m is not None:
        scheme, user, host, port, params = m.groups()
        if port is None:
            return SipUri(scheme, user, host, None, params)
        if 0 < int(port) < 65536:
            return SipUri(scheme, user, host, int(port), params)
    return _parse_uri_general(text)


def _parse_uri_general(text: str) -> SipUri | OtherUri:
    colon = text.find(":")
    if colon <= 0 or not _SCHEME.fullmatch(text, 0, colon):
        raise ParseError(f"not a URI: {text[:60]!r}")
    scheme = text[:colon].lower()
    rest = text[colon + 1:]
    if scheme in ("sip", "sips"):
        return _parse_sip(scheme, rest, text)
    if scheme == "tel":
        semi = rest.find(";")
        number, params = (rest, "") if semi < 0 else (rest[:semi], rest[semi:])
        if not _TEL.fullmatch(number) or not _PARAM.fullmatch(params):
            raise ParseError(f"bad tel URI: {text[:60]!r}")
        return SipUri("tel", number, "", None, params)
    if not _ABSOLUTE.fullmatch(rest):
        raise ParseError(f"bad URI: {text[:60]!r}")
    return OtherUri(scheme, text)


def _parse_sip(scheme: str, rest: str, text: str) -> SipUri:
    at = rest.find("@")
    user = password = None
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1:]
        pc = userinfo.find(":")
        if pc >= 0:
            user, password = userinfo[:pc], userinfo[pc + 1:]
            if not _PASSWORD.fullmatch(password):
                raise ParseError(f"bad password in URI: {text[:60]!r}")
        else:
            user = userinfo
        if not _USER.fullmatch(user):
            raise ParseError(f"bad user part in URI: {text[:60]!r}")
    q = rest.find("?")
    headers = ""
    if q >= 0:
        rest, headers = rest[:q], rest[q + 1:]
        if not _HEADERS.fullmatch(headers):
            raise ParseError(f"bad headers in URI: {text[:60]!r}")
    semi = rest.find(";")
    hostport, params = (rest, "") if semi < 0 else (rest[:semi], rest[semi:])
    if params and not _PARAM.fullmatch(params):
        raise ParseError(f"bad URI parameters: {text[:60]!r}")
    host, port = split_hostport(hostport)
    if host is None:
        raise ParseError(f"bad host in URI: {text[:60]!r}")
    return SipUri(scheme, user, host, port, params, headers, password)


def split_hostport(hostport: str) -> tuple[str | None, int | None]:
    """`host[:port]` (IPv6 in brackets) → (host, port); (None, None) when malformed."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            return None, None
        host, tail = hostport[: end + 1], hostport[end + 1:]
    else:
        pc = hostport.find(":")
        host, tail = (hostport, "") if pc < 0 else (hostport[:pc], hostport[pc:])
    if not host or not _HOST.fullmatch(host):
        return None, None
    if not tail:
        return host, None
    digits = tail[1:]
    # isdigit() alone would let latin-1 superscripts ('²') through to int()
    if tail[0] != ":" or not (digits.isascii() and digits.isdigit()) or len(tail) > 6:
        return None, None
    port = int(digits)
    if not 0 < port < 65536:
        return None, None
    return host, port


def _lookup_param(params: str, name: str) -> str | None:
    if not params:
        return None
    lname = name.lower()
    for part in params.split(";"):
        if not part:
            continue
        eq = part.find("=")
        key = part if eq < 0 else part[:eq]
        if "%" in key:  # RFC 3261 §19.1.4: `;%6C%72` is the `lr` parameter
            key = unquote_to_bytes(key).decode("latin-1")
        if key.strip().lower() == lname:
            return "" if eq < 0 else part[eq + 1:].strip()
    return None


def _drop_param(params: str, name: str) -> str:
    lname = name.lower()
    kept = [p for p in params.split(";") if p and p.split("=", 1)[0].strip().lower() != lname]
    return "".join(";" + p for p in kept)
