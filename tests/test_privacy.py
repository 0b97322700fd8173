"""The privacy rewrite and the sealed dialog rule (sans-IO, no network)."""

from __future__ import annotations

import base64

import pytest

from proxy.privacy import (
    DialogRule,
    DialogSealer,
    InvalidDialogToken,
    LeakScanner,
    hide_number,
    set_address_user,
)
from proxy.sip.message import parse_message

A, B, X = "13800000001", "13900000001", "700100000000001"
RULE = DialogRule(X, A, B, "+86" + A, "tag-a")


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
    assert sealer.open(token) == RULE
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


def test_token_from_another_key_is_refused() -> None:
    with pytest.raises(InvalidDialogToken):
        DialogSealer(bytes(32)).open(DialogSealer(b"k" * 32).seal(RULE))


def test_scanner_finds_every_wire_form_but_not_longer_digit_runs() -> None:
    scanner = LeakScanner(A)
    for form in (A, "+86" + A, "0086" + A, "86" + A):
        data = f"x <sip:{form}@h> y".encode()
        assert scanner.present(data)
        assert scanner.replace(data, X.encode()) == (f"x <sip:{X}@h> y".encode(), 1)
    longer = f"id={A}9".encode()
    assert scanner.replace(longer, X.encode()) == (longer, 0)


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
    assert m.header("x-custom") == f"caller={X}"
    assert m.body.startswith(f"v=0\r\no={X} ".encode())
    assert m.header("content-length") == str(len(m.body))
    assert scrubbed == 2  # X-Custom and the SDP: the rest had dedicated rewrites
    assert m.from_.display is None and m.from_.uri.user == X and m.from_.tag == "tag-a"


def test_hide_number_leaves_a_clean_message_byte_for_byte() -> None:
    data = invite(f"P-Asserted-Identity: <sip:{X}@10.0.0.2>", "X-Other: 13912345678")
    m = parse_message(data)
    set_address_user(m, "from", X)
    before = m.serialize()
    assert hide_number(m, A, X) == 0
    assert m.serialize() == before


def test_call_id_is_never_rewritten() -> None:
    m = parse_message(invite().replace(b"Call-ID: c1", f"Call-ID: {A}-c1@h".encode()))
    set_address_user(m, "from", X)
    hide_number(m, A, X)
    assert m.call_id == f"{A}-c1@h"
