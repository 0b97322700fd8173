"""The privacy rewrite: neither side of a call ever sees the other's real number.

A dialog's rule (who is the caller A, who the callee B, what the middle number X is) is decided
once, at the INVITE, and sealed into our Record-Route parameter with AES-256-GCM: every later
request of the dialog brings it back, so any worker, instance or restarted process can apply the
same rewrite, a tampered token fails authentication, and the token reveals no number.

`hide_number` is the single mechanism every direction uses: identity headers are rewritten to X
or removed, then a last-line-of-defence scan catches the number wherever else it appears.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.numbers import normalize_number
from proxy.sip.address import NameAddr, parse_name_addr
from proxy.sip.errors import ParseError
from proxy.sip.message import SipMessage
from proxy.sip.uri import SipUri

TOKEN_PARAM = "s7"
_TOKEN_VERSION = b"sip700-dialog-v1"

# Headers that can only carry an identity of the sender and have no translated equivalent:
# they go (RFC 3325 §5: PAI/PPI; RPID is the pre-3325 form; Identity is a signature over the
# original caller ID, void once rewritten, RFC 8224).
REMOVED_IDENTITY_HEADERS = (
    "p-preferred-identity", "remote-party-id", "diversion", "history-info", "identity",
    "identity-info", "reply-to", "p-called-party-id", "p-charging-vector",
    "p-associated-uri", "in-reply-to",
)
# Headers whose name-addr user we rewrite to X when it carries the hidden number.
REWRITTEN_ADDRESS_HEADERS = ("contact", "referred-by")


class InvalidDialogToken(Exception):
    """A Record-Route/Route token that fails authentication or does not decode."""


@dataclass(frozen=True, slots=True)
class DialogRule:
    """Who is who in one dialog. Numbers are national format."""

    x: str
    caller: str
    callee: str
    caller_user: str  # A's From user exactly as A sent it: restored in what A receives
    caller_tag: str  # A's From tag: tells which side sent an in-dialog request


class DialogSealer:
    """Seals and opens dialog rules (AES-256-GCM, random 96-bit nonce per dialog)."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, rule: DialogRule) -> str:
        plain = "|".join(
            (rule.x, rule.caller, rule.callee, rule.caller_user, rule.caller_tag)
        ).encode("latin-1")
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(nonce, plain, _TOKEN_VERSION)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def open(self, token: str) -> DialogRule:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            plain = self._aead.decrypt(raw[:12], raw[12:], _TOKEN_VERSION)
            x, caller, callee, caller_user, caller_tag = plain.decode("latin-1").split("|")
        except (InvalidTag, ValueError, TypeError) as exc:
            raise InvalidDialogToken("dialog token failed authentication") from exc
        return DialogRule(x, caller, callee, caller_user, caller_tag)


# ---- numbers inside URIs ----------------------------------------------------------------------

def uri_number(uri: object) -> str | None:
    """The national number in a sip:/tel: URI's user part, or None."""
    user = getattr(uri, "user", None)
    if not user:
        return None
    semi = user.find(";")  # RFC 4475 semiuri: user params (tel-style ;phone-context)
    if semi >= 0:
        user = user[:semi]
    if "%" in user:
        user = getattr(uri, "user_unescaped", user) or user
    return normalize_number(user)


def _with_user(addr: NameAddr, user: str, drop_display: bool) -> NameAddr:
    uri = addr.uri
    if isinstance(uri, SipUri):
        uri = uri.with_user(user)
    return addr.replace(uri=uri, display=None if drop_display else False)


def set_address_user(msg: SipMessage, name: str, user: str, *, drop_display: bool = True) -> None:
    """Put `user` in the URI of a From/To header (display name dropped: it can hold a number)."""
    addr = msg.from_ if name == "from" else msg.to
    msg.set_header(name, str(_with_user(addr, user, drop_display)))


# ---- the one mechanism: hide a number from the side that receives `msg` ------------------------

class LeakScanner:
    """Finds and replaces every wire form of one number (national, +86, 0086, 86)."""

    __slots__ = ("_intl", "_national", "_pattern")

    def __init__(self, national: str) -> None:
        self._national = national.encode()
        self._intl = (national[1:] if national.startswith("0") else national).encode()
        self._pattern: re.Pattern[bytes] | None = None  # compiled only when something is found

    def present(self, data: bytes) -> bool:
        # every wire form contains the national or the international digits: two C-level finds
        return self._intl in data or self._national in data

    def replace(self, data: bytes, x: bytes) -> tuple[bytes, int]:
        if self._pattern is None:
            self._pattern = re.compile(
                rb"(?<![0-9])(?:\+86|0086|86)?(?:" + re.escape(self._national)
                + rb"|" + re.escape(self._intl) + rb")(?![0-9])"
            )
        return self._pattern.subn(x, data)


def hide_number(msg: SipMessage, hidden: str, x: str) -> int:
    """Make `msg` safe for the side that must not learn `hidden`; returns leaks scrubbed.

    Identity headers: P-Asserted-Identity becomes X, sender-identity headers without a
    translation are removed, Contact/Referred-By users carrying the number become X. Then every
    other row and the body (SDP `o=` included) are scanned for any form of the number (the last
    line of defence); what is found is replaced by X and counted. From/To are the caller's job
    (they depend on the direction). The common case (the number appears nowhere) costs one
    join and two substring searches over the header block.
    """
    scanner = LeakScanner(hidden)
    rows = msg.rows
    names = {name for name, _ in rows}
    if not names.isdisjoint(_REMOVED):
        msg.rows = rows = [r for r in rows if r[0] not in _REMOVED]
        for name in names.intersection(_REMOVED):
            msg.forget_parsed(name)
    xb = x.encode()
    if "p-asserted-identity" in names:
        pai = [row for name, row in rows if name == "p-asserted-identity"]
        if len(pai) != 1 or scanner.present(pai[0]) or xb not in pai[0]:
            msg.set_header_values("p-asserted-identity", _pai_values(msg, x))
            rows = msg.rows
    found = 0
    if scanner.present(b"\n".join([row for _, row in rows])):
        carrying = {name for name, row in rows if scanner.present(row)}
        for name in REWRITTEN_ADDRESS_HEADERS:
            if name in carrying:
                _rewrite_users(msg, name, hidden, x)
        rows = msg.rows
        for i, (name, row) in enumerate(rows):
            if name != "call-id" and scanner.present(row):
                new, n = scanner.replace(row, xb)
                if n:
                    rows[i] = (name, new)
                    msg.forget_parsed(name)
                    found += n
    if msg.body and scanner.present(msg.body):
        body, n = scanner.replace(msg.body, xb)
        if n:
            msg.set_body(body)
            found += n
    return found


_REMOVED = frozenset(REMOVED_IDENTITY_HEADERS)



def _pai_values(msg: SipMessage, x: str) -> list[str]:
    out: list[str] = []
    for value in msg.header_values("p-asserted-identity"):
        try:
            addr = parse_name_addr(value, "P-Asserted-Identity")
        except ParseError:
            continue  # an identity we cannot read is not passed on
        uri = addr.uri
        if isinstance(uri, SipUri):
            out.append(f"<{uri.with_user(x) if uri.scheme != 'tel' else 'tel:' + x}>")
    return out


def _rewrite_users(msg: SipMessage, name: str, hidden: str, x: str) -> None:
    try:
        addrs = msg.name_addrs(name)
    except ParseError:
        msg.remove_header(name)  # unreadable identity-bearing header: never pass it on
        return
    changed = False
    values: list[str] = []
    for addr in addrs:
        if uri_number(addr.uri) == hidden:
            addr = _with_user(addr, x, drop_display=True)
            changed = True
        elif addr.display is not None and hidden in addr.display:
            addr = addr.replace(display=None)
            changed = True
        values.append(str(addr))
    if changed:
        msg.set_header_values(name, values)
