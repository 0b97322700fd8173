"""The privacy rewrite: neither side of a call ever sees the other's real number.

The core decides where a message goes and which dialog rule applies; the functions here make the
message safe for the side that receives it. This module is the one place to read, test and audit
what is hidden:

- `Privacy.initial_invite`: the INVITE that goes to the callee B.
- `Privacy.request`: an in-dialog request (or the ACK of a 2xx) going to either side.
- `Privacy.response`: a response going back to the side that sent the request.

What decides the direction is the sealed token the request brings: each side holds its own token
(B gets one in the INVITE's Record-Route, A a different one in the responses, RFC 3261 §16.7
step 4 allows rewriting our Record-Route there), so a party cannot pose as the other by forging
tags or headers. Whatever the direction, every row, the start line and the body are scanned for
the number the receiver must not learn (`NumberScanner`: separators, %-escapes, full-width
digits, prefixes), and the only rows that carry a real number to a side are the From/To rows that
side itself sent, restored.

Keys, from the configured 32-byte dialog key (HKDF, one sub-key per use):
- AES-256-GCM seals the dialog rule into our Record-Route parameter (`s7`);
- AES-SIV (deterministic) maps A's Call-ID to the Call-ID B sees and back, with no state;
- AES-SIV seals a Contact's real user into the rewritten Contact (`s7u`), so the Request-URI of
  an in-dialog request is restored exactly (Kamailio's topoh does the same).
"""

from __future__ import annotations

import binascii
import hashlib
import os
import re
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.bodies import make_body_safe
from proxy.numbers import normalize_number
from proxy.scanner import NumberScanner
from proxy.sip.address import NameAddr, parse_name_addr, put_bounded
from proxy.sip.errors import ParseError
from proxy.sip.message import SipMessage
from proxy.sip.uri import SipUri

TOKEN_PARAM: Final = "s7"  # our Record-Route / Route URI parameter: the sealed dialog rule
CONTACT_PARAM: Final = "s7u"  # a rewritten Contact's sealed real user
# the Call-ID the callee side sees: s7 + base64url(AES-SIV(A's Call-ID))
CALL_ID_PREFIX: Final = "s7"
CALLER: Final = "a"  # the two sides of a dialog
CALLEE: Final = "b"
_TOKEN_AAD: Final = b"sip700-dialog-v2"

# Headers that can only carry an identity of the sender and have no translated equivalent:
# they go (RFC 3325 §5: PPI; RPID is the pre-3325 form; Identity is a signature over the
# original caller ID, void once rewritten, RFC 8224).
REMOVED_IDENTITY_HEADERS: Final = (
    "p-preferred-identity", "remote-party-id", "diversion", "history-info", "identity",
    "identity-info", "reply-to", "p-called-party-id", "p-charging-vector",
    "p-associated-uri", "in-reply-to",
)
_REMOVED: Final = frozenset(REMOVED_IDENTITY_HEADERS)
_RESTORED_ROWS: Final = frozenset(("from", "to", "call-id", "via"))


# What `Privacy.hide` looks for in one pass over a message's rows: a bit per kind of header it
# treats apart (one dict lookup a row, where sets of names cost an insert and several lookups)
_KEPT_AS_IS: Final = 1  # From, To, Call-ID, Via: set or restored before the scrub, not scanned
_KIND_REMOVED: Final = 2
_KIND_PAI: Final = 4
_KIND_CONTACT: Final = 8
_KIND_REFERRED_BY: Final = 16
_HIDE_KINDS: Final[dict[str, int]] = {
    **{name: _KIND_REMOVED for name in REMOVED_IDENTITY_HEADERS},
    **{name: _KEPT_AS_IS for name in _RESTORED_ROWS},
    "p-asserted-identity": _KIND_PAI, "contact": _KIND_CONTACT,
    "referred-by": _KIND_REFERRED_BY,
}


class InvalidDialogToken(Exception):
    """A token, sealed Call-ID or sealed Contact user that fails authentication."""


class DialogRule:
    """Who is who in one dialog, as sealed into one side's token. Numbers are national.

    Treated as immutable (`with_peer` makes a changed copy). A plain class, not a dataclass:
    compiled, a dataclass's generated __init__ stays interpreted, and one is made per call.
    """

    __slots__ = ("call_id_digest", "callee", "caller", "caller_user", "deadline", "peer",
                 "side", "x")

    def __init__(self, x: str, caller: str, callee: str, caller_user: str, side: str = CALLER,
                 call_id_digest: str = "", deadline: int = 0, peer: str = "") -> None:
        self.x = x
        self.caller = caller
        self.callee = callee
        self.caller_user = caller_user  # A's From user exactly as A sent it: restored to A
        self.side = side  # the side holding this token: requests bearing it come from there
        self.call_id_digest = call_id_digest  # valid on this Call-ID only (as its side sees it)
        self.deadline = deadline  # unix time after which only ACK, BYE and CANCEL pass
        # how the other side (the receiver of requests bearing this token) is reached: its
        # leg's transport and, for a connection it opened to us, that connection
        # (proxy/legs.py); empty for UDP, so a UDP call's tokens are as short as ever
        self.peer = peer

    def _key(self) -> tuple[str, str, str, str, str, str, int, str]:
        return (self.x, self.caller, self.callee, self.caller_user, self.side,
                self.call_id_digest, self.deadline, self.peer)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DialogRule) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return ("DialogRule(x={!r}, caller={!r}, callee={!r}, caller_user={!r}, side={!r}, "
                "call_id_digest={!r}, deadline={!r}, peer={!r})".format(*self._key()))

    def with_peer(self, peer: str) -> DialogRule:
        """This rule, reached through `peer` instead."""
        return DialogRule(self.x, self.caller, self.callee, self.caller_user, self.side,
                          self.call_id_digest, self.deadline, peer)

    def hidden_from(self, receiver: str) -> str:
        """The number the receiving side must not learn."""
        return self.callee if receiver == CALLER else self.caller


# Call-IDs remembered per direction (~5 MiB at most). What a call repeats (180, 200, ACK, BYE)
# comes within its own lifetime; a miss costs one AES-SIV operation. Small enough to be full
# within minutes, so the process's size is flat after that (scripts/soak).
_MAP_MAX_ENTRIES = 1 << 14


def _put_bounded(table: dict, key: object, value: object) -> None:
    """`put_bounded` at the privacy memories' size (read at each call: tests shrink it)."""
    put_bounded(table, key, value, _MAP_MAX_ENTRIES)


_DIGESTS: Final[dict[str, str]] = {}  # Call-ID → digest, bounded


def call_id_digest(call_id: str) -> str:
    """What a dialog token binds its Call-ID by; remembered, since a dialog's ACK and BYE
    repeat the Call-ID the INVITE sealed (the key is the whole Call-ID: nothing to poison)."""
    digest = _DIGESTS.get(call_id)
    if digest is None:
        digest = hashlib.blake2b(call_id.encode("latin-1"), digest_size=8).hexdigest()
        _put_bounded(_DIGESTS, call_id, digest)
    return digest


# The sealed rule, compact (the token rides in every Record-Route and Route of the dialog,
# each side's SIP stack reads it on every message, and an INVITE must stay under the 1,300
# octets UDP allows it, RFC 3261 §18.1.1): a flags byte (its high bit tells it from the older
# layout, whose first byte is the high byte of X's length, 0), the numbers as packed decimal
# digits, the Call-ID digest as its 8 octets, the deadline in 4. 36 octets for a UDP call
# against 85 before: 86 characters of token instead of 151.
_COMPACT: Final = 0x80
_SIDE_CALLEE: Final = 0x01  # the side is CALLEE (else CALLER)
_SAME_USER: Final = 0x02  # caller_user is the caller's number: not repeated
_WITH_PEER: Final = 0x04  # a peer field ends the rule
_RAW_DIGEST: Final = 0x08  # the digest is 16 lower-case hex digits, sealed as 8 octets
_LONG_DEADLINE: Final = 0x10  # a deadline past 2106 (or negative): 8 octets
_OTHER_SIDE: Final = 0x20  # a side that is neither CALLER nor CALLEE: a field of its own
_DIGITS_MAX: Final = 100  # field header 0x80 + n: n packed digits; 0xFF: 2-octet length
_HEX: Final = frozenset("0123456789abcdef")


_PACKED: Final[dict[str, bytes]] = {}  # field text → packed field, bounded


def _pack_field(text: str) -> bytes:
    """A number as packed decimal digits (two to an octet), anything else as latin-1 text.
    Remembered: a call seals the same X and numbers into both sides' tokens, and X recurs."""
    packed = _PACKED.get(text)
    if packed is None:
        packed = _pack_field_now(text)
        _put_bounded(_PACKED, text, packed)
    return packed


def _pack_field_now(text: str) -> bytes:
    n = len(text)
    if 0 < n <= _DIGITS_MAX and text.isascii() and text.isdigit():
        return bytes((0x80 + n,)) + bytes.fromhex(text + "f" if n & 1 else text)
    raw = text.encode("latin-1")
    if len(raw) < 0x80:
        return bytes((len(raw),)) + raw
    return b"\xff" + struct.pack("!H", len(raw)) + raw


def _unpack_field(plain: bytes, pos: int) -> tuple[str, int]:
    head = plain[pos]
    pos += 1
    if head == 0xFF:
        (n,) = struct.unpack_from("!H", plain, pos)
        pos += 2
    elif head < 0x80:
        n = head
    else:
        n = head - 0x80
        size = (n + 1) // 2
        if not 0 < n <= _DIGITS_MAX or pos + size > len(plain):
            raise ValueError("bad digits field")
        return plain[pos:pos + size].hex()[:n], pos + size
    if pos + n > len(plain):
        raise ValueError("field past the end")
    return plain[pos:pos + n].decode("latin-1"), pos + n


def _pack_rule(rule: DialogRule) -> bytes:
    flags = _COMPACT
    side = rule.side
    if side == CALLEE:
        flags |= _SIDE_CALLEE
    elif side != CALLER:
        flags |= _OTHER_SIDE
    same_user = rule.caller_user == rule.caller
    if same_user:
        flags |= _SAME_USER
    digest = rule.call_id_digest
    raw_digest = len(digest) == 16 and _HEX.issuperset(digest)
    if raw_digest:
        flags |= _RAW_DIGEST
    deadline = rule.deadline
    long_deadline = not 0 <= deadline < 1 << 32
    if long_deadline:
        flags |= _LONG_DEADLINE
    if rule.peer:
        flags |= _WITH_PEER
    parts = [bytes((flags,)), _pack_field(rule.x), _pack_field(rule.caller),
             _pack_field(rule.callee)]
    if not same_user:
        parts.append(_pack_field(rule.caller_user))
    if flags & _OTHER_SIDE:
        parts.append(_pack_field(side))
    parts.append(bytes.fromhex(digest) if raw_digest else _pack_field(digest))
    parts.append(struct.pack("!q", deadline) if long_deadline else struct.pack("!I", deadline))
    if rule.peer:
        parts.append(_pack_field(rule.peer))
    return b"".join(parts)


def _unpack_rule(plain: bytes) -> DialogRule:
    flags = plain[0]
    x, pos = _unpack_field(plain, 1)
    caller, pos = _unpack_field(plain, pos)
    callee, pos = _unpack_field(plain, pos)
    caller_user = caller
    if not flags & _SAME_USER:
        caller_user, pos = _unpack_field(plain, pos)
    side = CALLEE if flags & _SIDE_CALLEE else CALLER
    if flags & _OTHER_SIDE:
        side, pos = _unpack_field(plain, pos)
    if flags & _RAW_DIGEST:
        if pos + 8 > len(plain):
            raise ValueError("digest past the end")
        digest = plain[pos:pos + 8].hex()
        pos += 8
    else:
        digest, pos = _unpack_field(plain, pos)
    if flags & _LONG_DEADLINE:
        (deadline,) = struct.unpack_from("!q", plain, pos)
        pos += 8
    else:
        (deadline,) = struct.unpack_from("!I", plain, pos)
        pos += 4
    peer = ""
    if flags & _WITH_PEER:
        peer, pos = _unpack_field(plain, pos)
    if pos != len(plain):
        raise ValueError("octets after the rule")
    return DialogRule(x, caller, callee, caller_user, side, digest, deadline, peer)


def _unpack_rule_v2(plain: bytes) -> DialogRule:
    """The layout before the compact one (2-octet lengths, text throughout): a dialog set up
    before an upgrade still routes."""
    fields: list[str] = []
    pos = 0
    for _ in range(6):
        (n,) = struct.unpack_from("!H", plain, pos)
        fields.append(plain[pos + 2: pos + 2 + n].decode("latin-1"))
        pos += 2 + n
    (deadline,) = struct.unpack_from("!Q", plain, pos)
    pos += 8
    peer = ""
    if pos < len(plain):
        (n,) = struct.unpack_from("!H", plain, pos)
        peer = plain[pos + 2: pos + 2 + n].decode("latin-1")
    x, caller, callee, caller_user, side, digest = fields
    return DialogRule(x, caller, callee, caller_user, side, digest, deadline, peer)


_TO_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")


def _b64(data: bytes) -> str:
    """base64url without padding (binascii directly: the base64 module's wrappers cost more
    than the encoding)."""
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(
        b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    """_b64 undone; anything outside the alphabet is an error (ValueError), not skipped."""
    raw = (text + "=" * (-len(text) % 4)).encode("ascii").translate(_FROM_URLSAFE)
    return binascii.a2b_base64(raw, strict_mode=True)


def _derive(key: bytes, label: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label).derive(key)


class _NoncePool:
    """Random 96-bit nonces for the dialog tokens, read from the kernel a few hundred at a time:
    one getrandom() call per token cost more than the rest of sealing it. The same bytes
    os.urandom(12) would give; a forked child starts with an empty pool (never its parent's)."""

    __slots__ = ("at", "data")

    def __init__(self) -> None:
        self.data = b""
        self.at = 0

    def take(self) -> bytes:
        at = self.at
        if at + 12 > len(self.data):
            self.data = os.urandom(12 * 256)
            at = 0
        self.at = at + 12
        return self.data[at:at + 12]

    def reset(self) -> None:
        self.data = b""
        self.at = 0


_NONCES: Final = _NoncePool()
os.register_at_fork(after_in_child=_NONCES.reset)


class DialogSealer:
    """The proxy's keyed transforms: dialog tokens, Call-IDs, Contact users."""

    __slots__ = ("_aead", "_call_ids", "_from_callee", "_opened", "_to_callee", "_users",
                 "_users_opened")

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(_derive(key, b"sip700 dialog token", 32))
        self._call_ids = AESSIV(_derive(key, b"sip700 call-id", 64))
        self._users = AESSIV(_derive(key, b"sip700 contact user", 64))
        # Call-IDs mapped lately, one table per direction: AES-SIV is deterministic, so a
        # remembered answer is the answer (a call maps its Call-ID for every in-dialog
        # request; this saves all but the first)
        self._to_callee: dict[str, str] = {}
        self._from_callee: dict[str, str] = {}
        # tokens opened lately: a dialog's every in-dialog request and response bears the same
        # one (the same text decrypts to the same rule, so a remembered one is the answer; its
        # deadline is still checked by the caller every time)
        self._opened: dict[str, DialogRule] = {}
        # sealed Contact users, as (sealed text, the Contact's host:port) → the real user: what
        # this sealer sealed or opened lately (the AES-SIV key binds both, so the pair is the
        # answer; any other host:port is decrypted, and refused)
        self._users_opened: dict[tuple[str, str], str] = {}

    # ---- dialog tokens (AES-256-GCM, random 96-bit nonce) ------------------------------------
    def seal(self, rule: DialogRule) -> str:
        nonce = _NONCES.take()
        token = _b64(nonce + self._aead.encrypt(nonce, _pack_rule(rule), _TOKEN_AAD))
        # what opening it would give: the dialog's ACK and BYE come back to this worker with
        # it, and need not decrypt what was just encrypted
        _put_bounded(self._opened, token, rule)
        return token

    def open(self, token: str) -> DialogRule:
        known = self._opened.get(token)
        if known is not None:
            return known
        rule = self._open(token)
        _put_bounded(self._opened, token, rule)
        return rule

    def _open(self, token: str) -> DialogRule:
        try:
            raw = _unb64(token)
            plain = self._aead.decrypt(raw[:12], raw[12:], _TOKEN_AAD)
            if plain and plain[0] & _COMPACT:
                return _unpack_rule(plain)
            return _unpack_rule_v2(plain)
        except (InvalidTag, ValueError, TypeError, IndexError, struct.error) as exc:
            raise InvalidDialogToken("dialog token failed authentication") from exc

    # ---- Call-IDs (AES-SIV: deterministic, so no state maps them back) ------------------------
    def callee_call_id(self, caller_call_id: str) -> str:
        """The Call-ID the callee side sees for A's Call-ID: reveals nothing, maps back."""
        known = self._to_callee.get(caller_call_id)
        if known is not None:
            return known
        mapped = CALL_ID_PREFIX + _b64(self._call_ids.encrypt(
            caller_call_id.encode("latin-1"), None))
        self._remember(caller_call_id, mapped)
        return mapped

    def caller_call_id(self, callee_call_id: str) -> str:
        """A's Call-ID back from the one the callee side uses. Raises InvalidDialogToken."""
        if not callee_call_id.startswith(CALL_ID_PREFIX):
            raise InvalidDialogToken("Call-ID was not made by this proxy")
        known = self._from_callee.get(callee_call_id)
        if known is not None:
            return known
        try:
            original = self._call_ids.decrypt(_unb64(callee_call_id[len(CALL_ID_PREFIX):]),
                                              None).decode("latin-1")
        except (InvalidTag, ValueError, TypeError) as exc:
            raise InvalidDialogToken("Call-ID failed authentication") from exc
        self._remember(original, callee_call_id)
        return original

    def _remember(self, caller_call_id: str, callee_call_id: str) -> None:
        if len(self._to_callee) >= _MAP_MAX_ENTRIES:
            self._to_callee.clear()  # bounded: hostile or huge traffic only costs the cache
            self._from_callee.clear()
        self._to_callee[caller_call_id] = callee_call_id
        self._from_callee[callee_call_id] = caller_call_id

    # ---- Contact users -----------------------------------------------------------------------
    def seal_user(self, user: str, hostport: str) -> str:
        """`user` sealed for the Contact at `hostport` only: a party that copies it into a
        Request-URI aimed anywhere else gets nothing back (it would otherwise learn the
        number by sending the request to itself)."""
        sealed = _b64(self._users.encrypt(user.encode("latin-1"), [hostport.encode("latin-1")]))
        # the ACK and BYE that target this Contact come back to this worker: what opening it
        # (for that same host:port only) gives is known
        _put_bounded(self._users_opened, (sealed, hostport), user)
        return sealed

    def open_user(self, sealed: str, hostport: str) -> str:
        known = self._users_opened.get((sealed, hostport))
        if known is not None:
            return known
        try:
            user = self._users.decrypt(_unb64(sealed),
                                       [hostport.encode("latin-1")]).decode("latin-1")
        except (InvalidTag, ValueError, TypeError) as exc:
            raise InvalidDialogToken("sealed Contact user failed authentication") from exc
        _put_bounded(self._users_opened, (sealed, hostport), user)
        return user


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


@dataclass(frozen=True)
class PrivacyPolicy:
    """The admin's choices (YAML `privacy:`)."""

    to_header: str = "middle_number"  # middle_number | callee
    add_asserted_identity: bool = True
    unreadable_body: str = "strip"  # strip | reject (requests; a response's is always stripped)
    isup: str = "strip"  # strip | rewrite
    refer: str = "reject"  # reject | pass


class Privacy:
    """Makes each message safe for the side that receives it."""

    __slots__ = ("_addresses", "_contacts", "asserted_host", "policy", "sealer")

    def __init__(self, sealer: DialogSealer, policy: PrivacyPolicy, asserted_host: str) -> None:
        self.sealer = sealer
        self.policy = policy
        self.asserted_host = asserted_host
        # Contact rows → their rewrite, for the calls of the last while: a party repeats its
        # Contact in every message of a call (INVITE, ACK, BYE; 180 and 200), and the rewrite
        # (parse, seal the user with AES-SIV, serialise) is a pure function of the rows
        self._contacts: dict[tuple, tuple[tuple[bytes, ...], int]] = {}
        # From / To rows → the same row with another user, for the calls of the last while:
        # a dialog's every request repeats its From and To (INVITE, ACK, BYE)
        self._addresses: dict[tuple[bytes, str], bytes] = {}

    # ---- requests ------------------------------------------------------------------------------
    def initial_invite(self, out: SipMessage, rule: DialogRule) -> int:
        """The INVITE to the callee (its Request-URI, chosen by the core, is set already)."""
        self._from_to(out, rule, CALLEE)
        out.set_header("call-id", self.sealer.callee_call_id(out.call_id))
        if self.policy.add_asserted_identity and not out.has("p-asserted-identity"):
            # the carrier network expects an asserted identity (RFC 3325); the caller's is X
            out.set_header("p-asserted-identity", f"<sip:{rule.x}@{self.asserted_host}>")
        return self.hide(out, rule.caller, rule.x, request=True)

    def request(self, out: SipMessage, rule: DialogRule, receiver: str) -> int:
        """An in-dialog request (or a 2xx ACK) going to `receiver`. Raises InvalidDialogToken
        when a sealed Call-ID or Contact user in it does not authenticate."""
        self._from_to(out, rule, receiver)
        call_id = out.call_id
        out.set_header("call-id", self.sealer.callee_call_id(call_id) if receiver == CALLEE
                       else self.sealer.caller_call_id(call_id))
        uri = out.uri
        if isinstance(uri, SipUri):
            sealed = uri.param(CONTACT_PARAM)
            if sealed is not None:  # the target is a Contact we rewrote: its real user back
                out.set_uri(uri.with_user(self.sealer.open_user(sealed, uri.hostport))
                            .without_param(CONTACT_PARAM))
        return self.hide(out, rule.hidden_from(receiver), rule.x, request=True)

    def _from_to(self, out: SipMessage, rule: DialogRule, receiver: str) -> None:
        self._set_user(out, "from", rule.x)
        if receiver == CALLER:  # A's own From, as the remote party's To in B's requests
            self._set_user(out, "to", rule.caller_user)
        elif self.policy.to_header == "callee":
            self._set_user(out, "to", rule.callee)

    def _set_user(self, msg: SipMessage, name: str, user: str) -> None:
        """set_address_user, remembered: the same row and user give the same new row."""
        rows = msg.rows
        at = next((i for i, item in enumerate(rows) if item[0] == name), -1)
        if at < 0:
            set_address_user(msg, name, user)  # raises the missing-header ParseError
            return
        key = (rows[at][1], user)
        new = self._addresses.get(key)
        if new is None:
            set_address_user(msg, name, user)
            new = next(row for n, row in msg.rows if n == name)
            _put_bounded(self._addresses, key, new)
            return
        msg.forget_parsed(name)
        rows[at] = (name, new)
        if any(item[0] == name for item in rows[at + 1:]):  # as set_header: one row stays
            msg.rows = rows[:at + 1] + [item for item in rows[at + 1:] if item[0] != name]

    # ---- responses -----------------------------------------------------------------------------
    def response(
        self, resp: SipMessage, restore: RestoreRows, rule: DialogRule, receiver: str,
        token_swap: tuple[bytes, bytes] | None = None,
    ) -> int:
        """A response going back to `receiver`, who sent the request `restore` was taken from
        (restore_of, on the request as received).

        Its From, To (with the far end's tag), Call-ID and Via rows are the ones `receiver`
        sent; our Record-Route token becomes the one that belongs to `receiver`.
        """
        restore_rows(resp, restore)
        if token_swap is not None:
            theirs, ours = token_swap
            rows = resp.rows
            for i, (name, row) in enumerate(rows):
                if name == "record-route" and row.find(theirs) >= 0:
                    rows[i] = (name, row.replace(theirs, ours))
            resp.forget_parsed("record-route")
        return self.hide(resp, rule.hidden_from(receiver), rule.x, request=False)

    # ---- the scrub every direction shares -----------------------------------------------------
    def hide(self, msg: SipMessage, hidden: str, x: str, *, request: bool) -> int:
        """Remove `hidden` from everything in `msg`; returns how much was scrubbed.

        Identity headers: P-Asserted-Identity becomes X, sender-identity headers without a
        translation are removed, a Contact whose user is the number becomes X with the real user
        sealed in `s7u`. Then the start line, every row but the restored From/To/Call-ID/Via
        and the body are scanned for any wire form of the number. Raises BodyRefused for a
        request whose body cannot be read when the policy is reject.
        """
        scanner = NumberScanner(hidden)
        rows = msg.rows
        # one pass over the rows: what kinds of header are there, and the rows the scrub may
        # change (not the From, To, Call-ID and Via rows, set or restored already)
        kinds = 0
        block: list[bytes] = []
        for name, row in rows:
            kind = _HIDE_KINDS.get(name)
            if kind is None:
                block.append(row)
            else:
                kinds |= kind
                if not kind & _KEPT_AS_IS:
                    block.append(row)
        found = 0
        xb = x.encode()
        if kinds & _KIND_REMOVED:
            removed = {r[0] for r in rows if r[0] in _REMOVED}
            msg.rows = rows = [r for r in rows if r[0] not in _REMOVED]
            block = [row for name, row in rows if name not in _RESTORED_ROWS]
            for name in removed:
                msg.forget_parsed(name)
                found += 1
        if kinds & _KIND_PAI:
            pai = [row for name, row in rows if name == "p-asserted-identity"]
            if len(pai) != 1 or pai[0].find(xb) < 0 or scanner.present(pai[0]):
                msg.set_header_values("p-asserted-identity", _pai_values(msg, x))
                rows = msg.rows
                block = [row for name, row in rows if name not in _RESTORED_ROWS]
        # one look at the start line and every row the scrub may change; most messages stop here
        start = msg.start_line
        block.append(start)
        if scanner.present(b"\n".join(block)):
            if scanner.present(start):
                new, n = scanner.replace(start, xb)
                if n:
                    found += n
                    _set_start_line(msg, new)
            if kinds & _KIND_CONTACT:
                found += self._rewrite_contacts(msg, scanner, hidden, x)
            if kinds & _KIND_REFERRED_BY:
                found += _rewrite_users(msg, "referred-by", scanner, hidden, x, None)
            rows = msg.rows
            # usually the Contact held it: one more look at those rows skips the rest
            if scanner.present(b"\n".join(
                    [row for name, row in rows if name not in _RESTORED_ROWS])):
                found += self._scrub_rows(msg, scanner, xb)
        if msg.body:
            found += make_body_safe(
                msg, lambda data: scanner.replace(data, xb), x=x,  # replace() asks present()
                unreadable=self.policy.unreadable_body if request else "strip",
                isup=self.policy.isup)
        return found

    @staticmethod
    def _scrub_rows(msg: SipMessage, scanner: NumberScanner, xb: bytes) -> int:
        found = 0
        rows = msg.rows
        for i, (name, row) in enumerate(rows):
            if name not in _RESTORED_ROWS and scanner.present(row):
                new, n = scanner.replace(row, xb)
                if n:
                    rows[i] = (name, new)
                    msg.forget_parsed(name)
                    found += n
        return found

    def _rewrite_contacts(self, msg: SipMessage, scanner: NumberScanner, hidden: str,
                          x: str) -> int:
        rows = tuple(row for name, row in msg.rows if name == "contact")
        key = (rows, hidden, x)
        known = self._contacts.get(key)
        if known is not None:
            new_rows, changed = known
            if changed:
                _replace_rows(msg, "contact", new_rows)
            return changed
        changed = _rewrite_users(msg, "contact", scanner, hidden, x, self.sealer)
        if len(self._contacts) >= _CONTACTS_MAX_ENTRIES:
            self._contacts.clear()  # bounded: distinct Contacts only cost the cache
        self._contacts[key] = (
            tuple(row for name, row in msg.rows if name == "contact") if changed else rows,
            changed)
        return changed


_CONTACTS_MAX_ENTRIES = 1 << 13  # as _MAP_MAX_ENTRIES: a call's own repeats


def _replace_rows(msg: SipMessage, name: str, new_rows: tuple[bytes, ...]) -> None:
    """Put `new_rows` where the first row of `name` was (as set_header_values does)."""
    rows = msg.rows
    first = next((i for i, (n, _) in enumerate(rows) if n == name), len(rows))
    kept = [r for r in rows if r[0] != name]
    kept[first:first] = [(name, row) for row in new_rows]
    msg.rows = kept
    msg.forget_parsed(name)


# What a response needs from the request it answers (restore_of): the request's Via rows
# and its From, To and Call-ID rows, as their names (Vias first), their octets end to end and
# where each ends, and whether its To carried a tag. A copy, made at once: a retired INVITE
# keeps it for 32 s (Timer L/M) while the request goes. Keeping the request's own row objects
# instead pinned them among the freed rest of it, and scattered the allocator's later work
# over those half-used pools (measured: a call's core CPU up 15-25 % in steady state).
RestoreRows = tuple[tuple[str, ...], bytes, tuple[int, ...], bool]


def restore_of(request: SipMessage) -> RestoreRows:
    """The rows of `request` its responses get back (restore_rows), taken once: an INVITE's
    responses all need the same ones, and a retired INVITE keeps only these for Timer L/M."""
    vias: list[bytes] = []
    names: list[str] = []
    single: list[bytes] = []
    seen = 0
    for name, row in request.rows:
        if name == "via":
            vias.append(row)
        else:
            bit = _SINGLE_BITS.get(name, 0)
            if bit and not seen & bit:  # the first of each only
                seen |= bit
                names.append(name)
                single.append(row)
    had_tag = True
    if seen & _TO_BIT:
        try:
            had_tag = request.to.tag is not None
        except ParseError:
            pass
    ends: list[int] = []
    end = 0
    for row in vias:
        end += len(row)
        ends.append(end)
    for row in single:
        end += len(row)
        ends.append(end)
    return (("via",) * len(vias) + tuple(names), b"".join(vias) + b"".join(single),
            tuple(ends), had_tag)


def restore_rows(resp: SipMessage, restore: RestoreRows) -> None:
    """Give a response the From, To (+ the far end's To tag), Call-ID and Via rows of the
    request it answers, exactly as they were received (RFC 3261 §8.2.6: a UAS copies them)."""
    names, blob, ends, had_tag = restore
    vias: list[tuple[str, bytes]] = []
    single: dict[str, tuple[str, bytes]] = {}
    start = 0
    for i in range(len(names)):
        name = names[i]
        end = ends[i]
        if name == "via":
            vias.append((name, blob[start:end]))
        else:
            single[name] = (name, blob[start:end])
        start = end
    to_item = single.get("to")
    if to_item is not None and resp.status > 100 and not had_tag:
        theirs = next((row for name, row in resp.rows if name == "to"), b"")
        tag = _to_tag(theirs)
        if tag is not None:
            single["to"] = ("to", to_item[1].rstrip() + b";tag=" + tag)
    rows: list[tuple[str, bytes]] = []
    via_done = False
    for item in resp.rows:
        name = item[0]
        if name == "via":
            if not via_done:
                via_done = True
                rows.extend(vias)
        elif name in _SINGLE_RESTORED:
            mine = single.get(name)  # one row each; a second one of theirs goes
            if mine is not None:
                del single[name]  # (compiled, `get` and `del` are C calls, `pop` a call by name)
                rows.append(mine)
        else:
            rows.append(item)
    resp.rows = rows
    for name in _RESTORED_ROWS:
        resp.forget_parsed(name)


_TO_BIT: Final = 2
_SINGLE_BITS: Final = {"from": 1, "to": _TO_BIT, "call-id": 4}
_SINGLE_RESTORED: Final = frozenset(_SINGLE_BITS)
_TO_TAG: Final = re.compile(rb";[ \t]*tag[ \t]*=[ \t]*([^;, \t\r\n>]+)", re.IGNORECASE)


def _to_tag(row: bytes) -> bytes | None:
    """The tag parameter of a To row (a header parameter: after the URI's closing '>')."""
    m = _TO_TAG.search(row, row.rfind(b">") + 1)
    return m.group(1) if m is not None else None


def _set_start_line(msg: SipMessage, start: bytes) -> None:
    if msg.is_request:
        msg.set_uri(start.split(b" ")[1].decode("latin-1"))
    else:
        reason = start.split(b" ", 2)[2] if start.count(b" ") >= 2 else b""
        msg.set_reason(reason.decode("utf-8", "replace"))


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


def _rewrite_users(msg: SipMessage, name: str, scanner: NumberScanner, hidden: str, x: str,
                   sealer: DialogSealer | None) -> int:
    """Name-addr values whose user is `hidden` get X (with the real user sealed, for Contact)."""
    try:
        addrs = msg.name_addrs(name)
    except ParseError:
        msg.remove_header(name)  # unreadable identity-bearing header: never pass it on
        return 1
    changed = 0
    values: list[str] = []
    for addr in addrs:
        uri = addr.uri
        if uri_number(uri) == hidden:
            if sealer is not None and isinstance(uri, SipUri) and uri.scheme != "tel":
                sealed = f";{CONTACT_PARAM}={sealer.seal_user(uri.user or '', uri.hostport)}"
                uri = SipUri(uri.scheme, x, uri.host, uri.port, uri.params + sealed,
                             uri.headers)
                addr = addr.replace(uri=uri, display=None)
            else:
                addr = _with_user(addr, x, drop_display=True)
            changed += 1
        elif addr.display is not None and scanner.present(addr.display.encode("latin-1")):
            addr = addr.replace(display=None)
            changed += 1
        values.append(str(addr))
    if changed:
        msg.set_header_values(name, values)
    return changed
