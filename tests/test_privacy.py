"""The privacy rewrite and the sealed dialog rule (sans-IO, no network)."""

from __future__ import annotations

import base64

import pytest

from proxy.privacy import (
    CALLEE,
    CALLER,
    CONTACT_PARAM,
    DialogRule,
    DialogSealer,
    InvalidDialogToken,
    Privacy,
    PrivacyPolicy,
    call_id_digest,
    restore_of,
    restore_rows,
    set_address_user,
)
from proxy.sip.message import parse_message

A, B, X = "13800000001", "13900000001", "700100000000001"
RULE = DialogRule(X, A, B, "+86" + A, CALLER, call_id_digest("c1"), 2_000_000_000)
SEALER = DialogSealer(bytes(range(32)))


def hide_number(m, hidden: str, x: str, policy: PrivacyPolicy | None = None) -> int:
    return Privacy(SEALER, policy or PrivacyPolicy(), "10.0.0.1").hide(m, hidden, x,
                                                                       request=True)


def msg(*rows: str, body: str = "") -> bytes:
    head = "\r\n".join(rows)
    return f"{head}\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()


def invite(*extra: str, body: str = "") -> bytes:
    return msg(
        f"INVITE sip:{X}@10.0.0.1 SIP/2.0",
        "Via: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK1",
        f'From: "{A}" <sip:{A}@10.0.0.2>;tag=tag-a',
        f"To: <sip:{X}@10.0.0.1>",
        "Call-ID: c1",
        "CSeq: 1 INVITE",
        *extra,
        body=body,
    )


def test_sealed_rule_round_trips_and_reveals_no_number() -> None:
    sealer = DialogSealer(bytes(range(32)))
    token = sealer.seal(RULE)
    assert sealer.open(token) is RULE  # the sealer remembers what it sealed
    # another worker (the same key, nothing remembered) decrypts it to the same rule
    assert DialogSealer(bytes(range(32))).open(token) == RULE
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for number in (A, B, X):
        assert number.encode() not in raw and number not in token
    assert sealer.seal(RULE) != token  # a fresh nonce per dialog


@pytest.mark.parametrize("mangle", [
    lambda t: t[:20] + ("A" if t[20] != "A" else "B") + t[21:],  # flipped ciphertext bits
    lambda t: t[:-3] + ("A" if t[-3] != "A" else "B") + t[-2:],  # flipped tag bits
    lambda t: t[:10],  # truncated
    lambda t: "!!" + t,  # not base64
    lambda t: "",
])
def test_tampered_tokens_fail_authentication(mangle) -> None:
    sealer = DialogSealer(bytes(32))
    with pytest.raises(InvalidDialogToken):
        sealer.open(mangle(sealer.seal(RULE)))


def test_a_udp_call_s_token_is_compact() -> None:
    """The rule is sealed packed (digits two to an octet, the digest as 8 octets): a UDP call's
    token is 86 characters, where the text layout made 151. It rides in every Record-Route and
    Route of the dialog."""
    rule = DialogRule(X, A, B, A, CALLEE, call_id_digest("1-10087@127.0.0.1"), 2_000_000_000)
    token = SEALER.seal(rule)
    assert len(token) == 86
    assert DialogSealer(bytes(range(32))).open(token) == rule


@pytest.mark.parametrize("rule", [
    RULE,  # caller_user is not the caller's number: sealed as its own field (text, "+86…")
    DialogRule(X, A, B, A, CALLEE, call_id_digest("c2"), 0),
    DialogRule("7001", "0086" + A, "1", "", CALLER, "", 7),  # leading zeros, odd, empty
    DialogRule(X, A, "sip-user.b", "x" * 300, "attacker", "not-a-digest", -5, "tcp 1 ::1 9"),
    DialogRule(X, "9" * 100, "1" * 101, "\xe9" * 3, CALLER, "ab" * 8, 1 << 40, "tls"),
])
def test_every_rule_round_trips_through_the_compact_layout(rule) -> None:
    """Numbers of any length (leading zeros kept), text where a number is expected, long
    fields, an unknown side, a digest that is not hex, deadlines outside 32 bits, a peer."""
    token = SEALER.seal(rule)
    assert DialogSealer(bytes(range(32))).open(token) == rule


def test_packed_fields_are_remembered_bounded(monkeypatch) -> None:
    """A call's two tokens share X and both numbers: packed once, remembered in a table that
    never grows past its bound, and a field packed from memory opens the same."""
    from proxy import privacy as privacy_module

    monkeypatch.setattr(privacy_module, "_MAP_MAX_ENTRIES", 4)
    rules = [DialogRule(X, f"1380000{n:04d}", f"1390000{n:04d}", f"1380000{n:04d}", side,
                        call_id_digest(f"p{n}"), 7) for n in range(12) for side in (CALLER, CALLEE)]
    for rule in rules:
        assert DialogSealer(bytes(range(32))).open(SEALER.seal(rule)) == rule
        assert len(privacy_module._PACKED) <= 4


def _seal_v2(sealer_key: bytes, rule: DialogRule) -> str:
    """A token as sip700 sealed it before the compact layout (2-octet lengths, text)."""
    import struct

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from proxy import privacy as privacy_module

    fields = (rule.x, rule.caller, rule.callee, rule.caller_user, rule.side,
              rule.call_id_digest)
    plain = b"".join(struct.pack("!H", len(f)) + f.encode("latin-1") for f in fields)
    plain += struct.pack("!Q", rule.deadline)
    if rule.peer:
        plain += struct.pack("!H", len(rule.peer)) + rule.peer.encode("latin-1")
    aead = AESGCM(privacy_module._derive(sealer_key, b"sip700 dialog token", 32))
    nonce = bytes(12)
    raw = nonce + aead.encrypt(nonce, plain, privacy_module._TOKEN_AAD)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("peer", ["", "tcp 1 10.0.0.9 7"])
def test_a_token_sealed_before_the_compact_layout_still_opens(peer) -> None:
    """A dialog set up before an upgrade keeps routing: the older layout is still read."""
    rule = DialogRule(X, A, B, "+86" + A, CALLEE, call_id_digest("c1"), 2_000_000_000, peer)
    old = _seal_v2(bytes(range(32)), rule)
    assert len(old) > 140
    assert DialogSealer(bytes(range(32))).open(old) == rule
    with pytest.raises(InvalidDialogToken):  # and it is still authenticated
        DialogSealer(bytes(32)).open(old)


def test_token_from_another_key_is_refused() -> None:
    with pytest.raises(InvalidDialogToken):
        DialogSealer(bytes(32)).open(DialogSealer(b"k" * 32).seal(RULE))


def test_hide_number_rewrites_identities_and_scrubs_everything_else() -> None:
    m = parse_message(invite(
        f"P-Asserted-Identity: <sip:{A}@10.0.0.2>, <tel:+86{A}>",
        f"Remote-Party-ID: <sip:{A}@10.0.0.2>;party=calling",
        f"P-Preferred-Identity: <sip:{A}@10.0.0.2>",
        f"Diversion: <sip:0086{A}@10.0.0.2>;reason=unconditional",
        f"History-Info: <sip:{A}@10.0.0.2>;index=1",
        "Identity: abc;info=<https://cert.example/x>",
        f'Contact: "{A}" <sip:+86{A}@10.0.0.2:5060>',
        f"X-Custom: caller={A}",
        "Content-Type: application/sdp",
        body=f"v=0\r\no={A} 1 1 IN IP4 10.0.0.2\r\ns=-\r\n",
    ))
    set_address_user(m, "from", X)
    scrubbed = hide_number(m, A, X)
    out = m.serialize()
    assert A.encode() not in out
    for gone in (b"Remote-Party-ID", b"P-Preferred-Identity", b"Diversion", b"History-Info",
                 b"\r\nIdentity:"):
        assert gone not in out
    assert m.header_values("p-asserted-identity") == [f"<sip:{X}@10.0.0.2>", f"<tel:{X}>"]
    contact = m.name_addrs("contact")[0]
    assert contact.uri.user == X and contact.display is None
    # the real user travels sealed, so the Contact can be restored as a Request-URI
    sealed = contact.uri.param(CONTACT_PARAM)
    assert SEALER.open_user(sealed, "10.0.0.2:5060") == "+86" + A
    with pytest.raises(InvalidDialogToken):  # only for the Contact it was made for
        SEALER.open_user(sealed, "10.0.0.66:5060")
    assert m.header("x-custom") == f"caller={X}"
    assert m.body.startswith(f"v=0\r\no={X} ".encode())
    assert m.header("content-length") == str(len(m.body))
    # 5 removed headers, the Contact, X-Custom and the SDP
    assert scrubbed == 8
    assert m.from_.display is None and m.from_.uri.user == X and m.from_.tag == "tag-a"


def test_hide_number_leaves_a_clean_message_byte_for_byte() -> None:
    data = invite(f"P-Asserted-Identity: <sip:{X}@10.0.0.2>", "X-Other: 13912345678")
    m = parse_message(data)
    set_address_user(m, "from", X)
    before = m.serialize()
    assert hide_number(m, A, X) == 0
    assert m.serialize() == before


def test_call_id_is_transformed_for_the_callee_and_maps_back() -> None:
    caller_call_id = f"{A}-4711@10.0.0.2"
    m = parse_message(invite().replace(b"Call-ID: c1", f"Call-ID: {caller_call_id}".encode()))
    Privacy(SEALER, PrivacyPolicy(), "10.0.0.1").initial_invite(m, RULE)
    seen_by_callee = m.call_id
    assert seen_by_callee != caller_call_id and A not in seen_by_callee
    assert A.encode() not in m.serialize()
    # deterministic: every later request of the dialog gets the same Call-ID, no state needed
    assert SEALER.callee_call_id(caller_call_id) == seen_by_callee
    assert SEALER.caller_call_id(seen_by_callee) == caller_call_id
    with pytest.raises(InvalidDialogToken):
        SEALER.caller_call_id(seen_by_callee[:-2] + "AA")
    with pytest.raises(InvalidDialogToken):
        SEALER.caller_call_id("some-other-call-id@host")


def test_request_for_the_caller_restores_its_contact_and_hides_the_callee() -> None:
    privacy = Privacy(SEALER, PrivacyPolicy(), "10.0.0.1")
    sealed = SEALER.seal_user(A, "10.0.0.2:5070")
    callee_call_id = SEALER.callee_call_id("c1")
    m = parse_message(msg(
        f"BYE sip:{X}@10.0.0.2:5070;{CONTACT_PARAM}={sealed} SIP/2.0",
        "Via: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK9",
        f'From: "139 0000 0001" <sip:{B}@10.0.0.9>;tag=tag-b',
        f"To: <sip:{X}@10.0.0.1>;tag=tag-a",
        f"Call-ID: {callee_call_id}",
        "CSeq: 2 BYE",
        "X-Leak: tel:+86-139-0000-0001",
    ))
    privacy.request(m, RULE, CALLER)
    out = m.serialize()
    assert m.uri_text == f"sip:{A}@10.0.0.2:5070"  # exactly A's Contact again
    assert m.call_id == "c1"
    assert m.to.uri.user == "+86" + A and m.to.tag == "tag-a"
    assert m.from_.uri.user == X and m.from_.display is None
    assert b"139" not in out.replace(X.encode(), b"")


def test_response_gets_the_receivers_rows_and_token() -> None:
    privacy = Privacy(SEALER, PrivacyPolicy(), "10.0.0.1")
    request = parse_message(invite("Via: SIP/2.0/UDP 10.0.0.3;branch=z9hG4bK0"))
    resp = parse_message(msg(
        f"SIP/2.0 180 Ringing {B}",
        "Via: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK1",
        "Via: SIP/2.0/UDP 10.0.0.3;branch=z9hG4bK0",
        "Record-Route: <sip:10.0.0.1;lr;s7=THEIRS>",
        f"From: <sip:{X}@10.0.0.2>;tag=tag-a",
        f"To: <sip:{B}@10.0.0.1>;tag=tag-b",
        f"Call-ID: {SEALER.callee_call_id('c1')}",
        "CSeq: 1 INVITE",
        "Contact: <sip:%31%33%39%30%30%30%30%30%30%30%31@10.0.0.9>",
    ))
    privacy.response(resp, restore_of(request), RULE, CALLER, (b"THEIRS", b"OURS"))
    out = resp.serialize()
    assert resp.reason == f"Ringing {X}"
    assert resp.header("record-route") == "<sip:10.0.0.1;lr;s7=OURS>"
    assert resp.call_id == "c1"
    assert resp.from_.display is not None and resp.from_.uri.user == A  # A's own From row
    assert resp.to.tag == "tag-b" and resp.to.uri.user == X
    assert b"%31%33%39" not in out and B.encode() not in out


def test_restore_takes_the_first_of_each_row_and_the_far_ends_to_tag() -> None:
    request = parse_message(msg(
        f"INVITE sip:{X}@10.0.0.1 SIP/2.0",
        "Via: SIP/2.0/UDP 10.0.0.3;branch=z9hG4bK0",
        "Via: SIP/2.0/UDP 10.0.0.4;branch=z9hG4bK9",
        f"From: <sip:{A}@10.0.0.3>;tag=tag-a",
        f"From: <sip:{B}@10.0.0.3>;tag=second",
        f"To: <sip:{X}@10.0.0.1>",
        "Call-ID: c1",
        "CSeq: 1 INVITE",
    ))
    restore = restore_of(request)
    names, blob, ends, had_tag = restore
    assert names == ("via", "via", "from", "to", "call-id") and not had_tag
    rows = [blob[start:end] for start, end in zip((0, *ends[:-1]), ends, strict=True)]
    assert rows == [r for r in request.serialize().split(b"\r\n")
                    if r.startswith((b"Via", b"From: <sip:" + A.encode(), b"To", b"Call-ID"))]
    assert not any(row is r for row in rows for _, r in request.rows)  # a copy: the request
    for status, tagged in ((180, True), (100, False)):
        resp = parse_message(msg(
            f"SIP/2.0 {status} Whatever",
            "Via: SIP/2.0/UDP 10.0.0.3;branch=z9hG4bK0",
            f"From: <sip:{X}@10.0.0.9>;tag=other",
            f"To: <sip:{B}@10.0.0.9>;tag=tag-b",
            "Call-ID: theirs",
            "CSeq: 1 INVITE",
        ))
        restore_rows(resp, restore)
        assert len(resp.header_values("via")) == 2 and resp.call_id == "c1"
        assert resp.from_.uri.user == A and resp.from_.tag == "tag-a"
        assert resp.to.uri.user == X
        assert resp.to.tag == ("tag-b" if tagged else None)  # a 100 carries no To tag
    # a request whose To has a tag already (in-dialog): its responses keep it as it was
    in_dialog = parse_message(msg(
        f"BYE sip:{X}@10.0.0.1 SIP/2.0", "Via: SIP/2.0/UDP 10.0.0.3;branch=z9hG4bK1",
        f"From: <sip:{A}@10.0.0.3>;tag=tag-a", f"To: <sip:{X}@10.0.0.1>;tag=mine",
        "Call-ID: c1", "CSeq: 2 BYE"))
    assert restore_of(in_dialog)[3] is True
    resp = parse_message(msg(
        "SIP/2.0 200 OK", "Via: SIP/2.0/UDP 10.0.0.3;branch=z9hG4bK1",
        f"From: <sip:{X}@10.0.0.9>;tag=other", f"To: <sip:{B}@10.0.0.9>;tag=theirs",
        "Call-ID: theirs", "CSeq: 2 BYE"))
    restore_rows(resp, restore_of(in_dialog))
    assert resp.to.tag == "mine"


def test_unreadable_body_is_stripped_or_refused() -> None:
    from proxy.bodies import BodyRefused

    body = "\x1f\x8b binary"
    m = parse_message(invite("Content-Type: application/sdp", "Content-Encoding: gzip",
                             body=body))
    hide_number(m, A, X)
    assert m.body == b"" and not m.has("content-encoding") and m.header("content-length") == "0"
    m = parse_message(invite("Content-Type: application/sdp", "Content-Encoding: gzip",
                             body=body))
    with pytest.raises(BodyRefused):
        hide_number(m, A, X, PrivacyPolicy(unreadable_body="reject"))


def test_sides_hide_the_other_party() -> None:
    assert RULE.hidden_from(CALLER) == B and RULE.hidden_from(CALLEE) == A


def test_remembered_contact_rewrites_equal_fresh_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Contact rewrite is cached per rows: a second message with the same Contact gets
    exactly what a fresh Privacy computes; a different Contact is not taken for it; the cache
    is bounded."""
    import proxy.privacy as privacy_module

    contact = f'Contact: "{A}" <sip:+86{A}@10.0.0.2:5060>, <sip:{A}@10.0.0.3>'
    privacy = Privacy(SEALER, PrivacyPolicy(), "10.0.0.1")
    first, second = parse_message(invite(contact)), parse_message(invite(contact))
    assert privacy.hide(first, A, X, request=True) == privacy.hide(second, A, X, request=True)
    fresh = parse_message(invite(contact))
    Privacy(SEALER, PrivacyPolicy(), "10.0.0.1").hide(fresh, A, X, request=True)
    assert first.serialize() == second.serialize() == fresh.serialize()
    assert all(A.encode() not in row for name, row in second.rows if name == "contact")
    other = parse_message(invite(f"Contact: <sip:{A}@10.0.0.9:5070>"))
    privacy.hide(other, A, X, request=True)
    sealed = other.name_addrs("contact")[0].uri.param(CONTACT_PARAM)
    assert SEALER.open_user(sealed, "10.0.0.9:5070") == A  # sealed for its own host:port
    monkeypatch.setattr(privacy_module, "_CONTACTS_MAX_ENTRIES", 2)
    for n in range(5):
        privacy.hide(parse_message(invite(f"Contact: <sip:{A}@10.0.1.{n}>")), A, X,
                     request=True)
    assert len(privacy._contacts) <= 2


def test_remembered_call_ids_change_nothing_and_stay_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import proxy.privacy as privacy_module

    sealer = DialogSealer(bytes(range(32)))
    image = sealer.callee_call_id("call-a@host")
    assert sealer.callee_call_id("call-a@host") == image == SEALER.callee_call_id("call-a@host")
    assert sealer.caller_call_id(image) == "call-a@host"
    # a caller's Call-ID that looks like an image is never taken for one
    sealer.callee_call_id(image)
    with pytest.raises(InvalidDialogToken):
        sealer.caller_call_id(image[:-2] + "AA")
    assert sealer.caller_call_id(image) == "call-a@host"
    monkeypatch.setattr(privacy_module, "_MAP_MAX_ENTRIES", 3)
    for n in range(10):
        assert sealer.caller_call_id(sealer.callee_call_id(f"c{n}")) == f"c{n}"
    assert len(sealer._to_callee) <= 3 and len(sealer._from_callee) <= 3


def test_call_id_digest_is_remembered_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    import proxy.privacy as privacy_module

    def digest(call_id: str) -> str:
        return hashlib.blake2b(call_id.encode("latin-1"), digest_size=8).hexdigest()

    monkeypatch.setattr(privacy_module, "_MAP_MAX_ENTRIES", 3)
    for n in range(10):
        for _ in range(2):  # the second time from memory: the same digest
            assert call_id_digest(f"memo-{n}@h") == digest(f"memo-{n}@h")
    assert call_id_digest("memo-1@h") != call_id_digest("memo-2@h")
    assert len(privacy_module._DIGESTS) <= 3


def _nonce(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))[:12]


def test_token_nonces_are_distinct_across_pool_refills() -> None:
    """Nonces come from a pool refilled from the kernel: every token still gets its own, also
    across refills (the pool holds 256)."""
    nonces = {_nonce(SEALER.seal(RULE)) for _ in range(700)}
    assert len(nonces) == 700
    assert all(SEALER.open(SEALER.seal(RULE)) == RULE for _ in range(3))


def test_a_forked_child_never_reuses_its_parent_s_nonces() -> None:
    """The pool is emptied in a forked child (workers are forked): the parent's next nonce and
    the child's first one differ. Without the reset both would take the same pool slot."""
    import os

    SEALER.seal(RULE)  # the pool is filled in the parent
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first nonce to the parent, then out at once
        try:
            os.write(write_fd, _nonce(SEALER.seal(RULE)))
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        child = os.read(read_fd, 12)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    parent = _nonce(SEALER.seal(RULE))
    assert len(child) == 12 and child != parent


def test_token_base64_is_the_base64_module_s() -> None:
    """The tokens' base64url (binascii directly) encodes as base64.urlsafe_b64encode without
    padding and refuses what b64decode(validate=True) refuses, accepting what it accepts."""
    import os
    import random

    from proxy.privacy import _b64, _unb64

    for n in range(70):
        data = os.urandom(n)
        assert _b64(data) == base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        assert _unb64(_b64(data)) == data
    rng = random.Random(7)
    alphabet = "ABCxyz019-_+/=. \n%é\x00"
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9)))
        try:
            expected: bytes | None = base64.b64decode(text + "=" * (-len(text) % 4),
                                                      altchars=b"-_", validate=True)
        except ValueError:
            expected = None
        try:
            got: bytes | None = _unb64(text)
        except ValueError:
            got = None
        assert got == expected, text


def test_sealed_contact_users_are_remembered_for_their_own_host_port_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The sealer remembers what it sealed (the ACK and BYE to that Contact come back to it);
    a second sealer with the same key decrypts it; the pair (sealed text, host:port) is the
    key of that memory, so another host:port is still decrypted, and refused."""
    import proxy.privacy as privacy_module

    sealer = DialogSealer(bytes(range(32)))
    sealed = sealer.seal_user(A, "10.0.0.2:5070")
    assert sealer.open_user(sealed, "10.0.0.2:5070") == A
    assert DialogSealer(bytes(range(32))).open_user(sealed, "10.0.0.2:5070") == A
    for hostport in ("10.0.0.2:5071", "10.0.0.66:5070"):
        with pytest.raises(InvalidDialogToken):
            sealer.open_user(sealed, hostport)
    mid = len(sealed) // 2
    flipped = sealed[:mid] + ("A" if sealed[mid] != "A" else "B") + sealed[mid + 1:]
    with pytest.raises(InvalidDialogToken):
        sealer.open_user(flipped, "10.0.0.2:5070")
    with pytest.raises(InvalidDialogToken):
        DialogSealer(bytes(32)).open_user(sealed, "10.0.0.2:5070")  # another key
    monkeypatch.setattr(privacy_module, "_MAP_MAX_ENTRIES", 3)
    pairs = [(sealer.seal_user(f"1380000000{n}", f"10.0.0.{n}:5060"), n) for n in range(10)]
    assert all(sealer.open_user(s, f"10.0.0.{n}:5060") == f"1380000000{n}" for s, n in pairs)
    assert len(sealer._users_opened) <= 3


def test_opened_tokens_are_remembered_bounded_and_never_a_forgery(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A token opened once is answered from memory the next time (the same text decrypts to the
    same rule); a changed token is still refused, and the memory stays bounded."""
    import proxy.privacy as privacy_module

    sealer = DialogSealer(bytes(range(32)))
    token = DialogSealer(bytes(range(32))).seal(RULE)  # sealed elsewhere: opened here first
    first = sealer.open(token)
    assert first == RULE and sealer.open(token) is first  # the remembered rule
    # a middle character carries six bits of the ciphertext (the last one may carry only
    # padding bits, which base64 ignores: the same token, not a forgery)
    mid = len(token) // 2
    flipped = token[:mid] + ("A" if token[mid] != "A" else "B") + token[mid + 1:]
    for mangled in (flipped, token[:-4], token + "AA"):
        with pytest.raises(InvalidDialogToken):
            sealer.open(mangled)
    with pytest.raises(InvalidDialogToken):
        DialogSealer(bytes(32)).open(token)  # another key: the memory is per key
    monkeypatch.setattr(privacy_module, "_MAP_MAX_ENTRIES", 3)
    tokens = [sealer.seal(RULE) for _ in range(10)]
    assert all(sealer.open(t) == RULE for t in tokens)
    assert len(sealer._opened) <= 3


def test_remembered_from_to_rewrites_equal_fresh_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dialog's requests repeat their From and To: the rewrite of a row is remembered, keyed
    by the row and the user put in, and gives what set_address_user gives, in every direction
    and for every user; the memory stays bounded."""
    import proxy.privacy as privacy_module

    def bye(frm: str, to: str) -> bytes:
        return msg(f"BYE sip:{X}@10.0.0.1 SIP/2.0", "Via: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK2",
                   f"From: {frm}", f"To: {to}", "Call-ID: c1", "CSeq: 2 BYE")

    def fresh(data: bytes, receiver: str, rule: DialogRule) -> list[tuple[str, bytes]]:
        m = parse_message(data)
        set_address_user(m, "from", rule.x)
        if receiver == CALLER:
            set_address_user(m, "to", rule.caller_user)
        return m.rows

    privacy = Privacy(SEALER, PrivacyPolicy(), "10.0.0.1")
    other = DialogRule(X, "13800000002", B, "13800000002", CALLER)
    rows = (f'"{A}" <sip:{A}@10.0.0.2>;tag=tag-a', f"<sip:{X}@10.0.0.1>;tag=tag-b")
    for rule, receiver in ((RULE, CALLEE), (RULE, CALLER), (other, CALLER), (RULE, CALLER)):
        for _ in range(2):  # the second time from memory
            m = parse_message(bye(*rows))
            privacy._from_to(m, rule, receiver)
            assert m.rows == fresh(bye(*rows), receiver, rule)
            assert m.from_.uri.user == X and m.from_.display is None and m.from_.tag == "tag-a"
            want_to = rule.caller_user if receiver == CALLER else X
            assert m.to.uri.user == want_to and m.to.tag == "tag-b"
    # (From row, X), (To row, "+86" + A), (To row, 13800000002): one entry each
    assert len(privacy._addresses) == 3
    monkeypatch.setattr(privacy_module, "_MAP_MAX_ENTRIES", 3)
    for n in range(10):
        m = parse_message(bye(f"<sip:1380000001{n}@10.0.0.2>;tag=t{n}", rows[1]))
        privacy._from_to(m, RULE, CALLEE)
        assert m.from_.uri.user == X and m.from_.tag == f"t{n}"
    assert len(privacy._addresses) <= 3
