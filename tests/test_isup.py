"""ISUP party-number rewrite (ITU-T Q.763), on messages written out octet by octet."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.isup import (
    ANM,
    CALLING_PARTY_NUMBER,
    CON,
    CONNECTED_NUMBER,
    GENERIC_NUMBER,
    IAM,
    ORIGINAL_CALLED_NUMBER,
    REDIRECTING_NUMBER,
    IsupError,
    IsupMessage,
    Number,
    decode_number_param,
    encode_number_param,
    parse_isup,
    rewrite_isup,
    rewrite_isup_counted,
)

A = "13800000001"
X = "700100000000001"
A_BCD = bytes.fromhex("310800000001")  # 13800000001 as address signals, filler in the last
X_BCD = bytes.fromhex("0710000000000001")  # 700100000000001

CALLED_X = (
    b"\x0a"  # called party number length: 10
    b"\x83"  # odd/even 1 (15 signals), nature of address 3: national (significant) number
    b"\x90"  # INN 1 (routing to internal network number not allowed), numbering plan 001 ISDN
    + X_BCD
)

# An IAM as a Chinese SIP-I gateway sends it (Q.763 clause 4, IAM)
IAM_BODY = (
    b"\x01"  # message type: IAM
    b"\x00"  # nature of connection indicators: no satellite, no continuity check, no echo ctl
    b"\x60\x01"  # forward call indicators: national call, ISUP all the way, ISUP not required
    #            all the way; originating access ISDN
    b"\x0a"  # calling party's category: ordinary calling subscriber
    b"\x03"  # transmission medium requirement: 3.1 kHz audio
    b"\x02"  # pointer to the called party number (2 octets on, after this and the next pointer)
    b"\x0c"  # pointer to the optional part: 1 + length octet + 10 octets of called party number
    + CALLED_X
    + b"\x0a\x08"  # calling party number (Q.763 §3.10), length 8
    b"\x83"  # odd/even 1 (11 signals), nature of address 3 national
    b"\x13"  # NI 0 complete, numbering plan ISDN, presentation allowed, screening network provided
    + A_BCD  # 1 3 | 8 0 | 0 0 | 0 0 | 0 0 | 1 + filler 0
    + b"\xc0\x0a"  # generic number (Q.763 §3.26), length 10
    b"\x06"  # number qualifier indicator: additional calling party number
    b"\x84"  # odd/even 1 (13 signals), nature of address 4 international
    b"\x11"  # NI 0, numbering plan ISDN, presentation allowed, screening user provided verified
    b"\x68" + A_BCD  # 8 6 | then 13800000001
    + b"\x0b\x08"  # redirecting number (Q.763 §3.44), length 8
    b"\x83"  # odd/even 1, national
    b"\x14"  # spare, numbering plan ISDN, presentation restricted, spare
    b"\x31\x09\x00\x00\x00\x02"  # 13900000002
    b"\x28\x08"  # original called number (Q.763 §3.39), length 8
    b"\x83"  # odd/even 1, national
    b"\x10"  # spare, numbering plan ISDN, presentation allowed, spare
    b"\x31\x09\x00\x00\x00\x02"  # 13900000002
    b"\x13\x02"  # redirection information (Q.763 §3.45), length 2
    b"\x03\x31"  # call diverted, reason unconditional, counter 1
    b"\x39\x02\x31\xc0"  # parameter compatibility information, length 2
    b"\x3d\x01\x1f"  # hop counter (Q.763 §3.80): 31
    b"\x1d\x03\x80\x90\xa3"  # user service information: speech, 64 kbit/s, G.711 A-law
    b"\x00"  # end of optional parameters
)
UNTOUCHED = [(0x13, b"\x03\x31"), (0x39, b"\x31\xc0"), (0x3D, b"\x1f"), (0x1D, b"\x80\x90\xa3")]

CONNECTED_B = (
    b"\x21\x08"  # connected number (Q.763 §3.16), length 8
    b"\x83"  # odd/even 1, national
    b"\x03"  # spare, numbering plan 000, presentation allowed, screening network provided
    b"\x31\x09\x00\x00\x00\x01"  # 13900000001: B, which A must not learn
)
ANM_BODY = (
    b"\x09"  # message type: ANM
    b"\x01"  # pointer to the optional part: the next octet
    b"\x11\x02\x14\x12"  # backward call indicators (Q.763 §3.5)
    + CONNECTED_B
    + b"\x00"  # end of optional parameters
)
CON_BODY = (
    b"\x07"  # message type: CON
    b"\x16\x14"  # backward call indicators: charge, subscriber free, ordinary, ISUP all the way
    b"\x01"  # pointer to the optional part
    + CONNECTED_B
    + b"\x29\x01\x01"  # optional backward call indicators: in-band information available
    b"\x00"  # end of optional parameters
)


def optional(data: bytes) -> dict[int, bytes]:
    msg = parse_isup(data)
    assert msg.optional is not None
    return dict(msg.optional)


# ---- helpers -----------------------------------------------------------------------------------

def test_number_param_bcd_low_nibble_first_with_filler() -> None:
    assert encode_number_param(A, 3, 0x13) == b"\x83\x13" + A_BCD
    assert encode_number_param("1234", 4, 0x10) == b"\x04\x10\x21\x43"  # even: no filler
    assert decode_number_param(b"\x83\x13" + A_BCD) == Number(3, 0x13, A)
    assert decode_number_param(b"\x04\x10\x21\x43") == Number(4, 0x10, "1234")
    assert decode_number_param(b"\x03\x10\x21\xf3").digits == "123F"  # ST


@pytest.mark.parametrize("bad", ["", "12x", "１２", "+86"])
def test_number_param_refuses_non_digits(bad: str) -> None:
    with pytest.raises(ValueError):
        encode_number_param(bad, 3, 0)


def test_decode_refuses_short_or_empty_odd() -> None:
    for content in (b"", b"\x83", b"\x83\x13"):
        with pytest.raises(IsupError):
            decode_number_param(content)


def test_parse_then_encode_is_byte_exact() -> None:
    for body in (IAM_BODY, ANM_BODY, CON_BODY, b"\x09\x00"):
        assert parse_isup(body).encode() == body


# ---- IAM -----------------------------------------------------------------------------------------

def test_iam_party_numbers_become_x() -> None:
    out = rewrite_isup(IAM_BODY, X)
    params = optional(out)
    assert decode_number_param(params[CALLING_PARTY_NUMBER]) == Number(3, 0x13, X)
    assert params[CALLING_PARTY_NUMBER][0] == 0x83  # 15 signals: odd
    generic = params[GENERIC_NUMBER]
    assert generic[0] == 0x06  # number qualifier kept
    assert decode_number_param(generic[1:]) == Number(3, 0x11, X)
    assert decode_number_param(params[REDIRECTING_NUMBER]) == Number(3, 0x14, X)
    assert decode_number_param(params[ORIGINAL_CALLED_NUMBER]) == Number(3, 0x10, X)
    for code, content in UNTOUCHED:
        assert params[code] == content
    assert A_BCD not in out and b"\x31\x09\x00\x00\x00\x02" not in out
    assert out.endswith(b"\x1d\x03\x80\x90\xa3\x00")


def test_iam_mandatory_part_byte_exact_and_parameter_order_kept() -> None:
    out = rewrite_isup(IAM_BODY, X)
    assert out[:8 + len(CALLED_X)] == IAM_BODY[:8 + len(CALLED_X)]
    msg = parse_isup(out)
    assert msg.variable == [CALLED_X[1:]]
    assert msg.optional is not None
    assert [code for code, _ in msg.optional] == [0x0A, 0xC0, 0x0B, 0x28, 0x13, 0x39, 0x3D, 0x1D]
    # every rewritten parameter grew: 15 signals take 8 octets
    assert len(out) == len(IAM_BODY) + 2 + 1 + 2 + 2


def test_even_x_has_no_filler() -> None:
    x = "70010000000001"
    params = optional(rewrite_isup(IAM_BODY, x))
    cgpn = params[CALLING_PARTY_NUMBER]
    assert cgpn[0] == 0x03 and len(cgpn) == 2 + 7
    assert decode_number_param(cgpn).digits == x


def test_counted_reports_rewritten_parameters() -> None:
    out, count = rewrite_isup_counted(IAM_BODY, X)
    assert count == 4 and out == rewrite_isup(IAM_BODY, X)


def test_number_without_address_signals_is_left_alone() -> None:
    iam = (
        b"\x01\x00\x60\x01\x0a\x03"  # IAM, fixed part as above
        b"\x02\x0c" + CALLED_X  # pointers, called party number
        + b"\x0a\x02"  # calling party number, length 2
        b"\x00"  # odd/even 0, nature of address 0 (spare): address not available
        b"\x0b"  # presentation "address not available", screening network provided
        b"\x00"  # end of optional parameters
    )
    assert rewrite_isup_counted(iam, X) == (iam, 0)


def test_iam_without_optional_part() -> None:
    iam = b"\x01\x00\x60\x01\x0a\x03" b"\x02\x00" + CALLED_X  # pointer to optional part 0
    assert rewrite_isup(iam, X) is iam


def test_called_party_number_only_on_request() -> None:
    b = "13900000001"
    out = rewrite_isup(IAM_BODY, X, called=b)
    msg = parse_isup(out)
    assert decode_number_param(msg.variable[0]) == Number(3, 0x90, b)
    assert out[7] == 2 + len(msg.variable[0])  # pointer to the optional part follows the change
    assert optional(out) == optional(rewrite_isup(IAM_BODY, X))
    st_called = (
        b"\x0a"  # length 10
        b"\x03"  # odd/even 0 (16 signals: 15 digits and ST), national
        b"\x90" + X_BCD[:-1] + b"\xf1"  # ... 1, ST (Q.763 §3.9 e: 1111 end of pulsing)
    )
    iam = IAM_BODY[:8] + st_called + IAM_BODY[8 + len(CALLED_X):]
    out = rewrite_isup(iam, X, called=b)
    assert decode_number_param(parse_isup(out).variable[0]).digits == b + "F"


# ---- ANM, CON, others ---------------------------------------------------------------------------

def test_anm_connected_number_becomes_x() -> None:
    out = rewrite_isup(ANM_BODY, X)
    assert out[:2] == b"\x09\x01"
    params = optional(out)
    assert params[0x11] == b"\x14\x12"
    assert decode_number_param(params[CONNECTED_NUMBER]) == Number(3, 0x03, X)
    assert b"\x31\x09\x00\x00\x00\x01" not in out


def test_con_connected_number_becomes_x() -> None:
    out = rewrite_isup(CON_BODY, X)
    assert out[:4] == b"\x07\x16\x14\x01"
    params = optional(out)
    assert decode_number_param(params[CONNECTED_NUMBER]) == Number(3, 0x03, X)
    assert params[0x29] == b"\x01"
    assert b"\x31\x09\x00\x00\x00\x01" not in out


def test_anm_without_optional_part() -> None:
    assert rewrite_isup(b"\x09\x00", X) == b"\x09\x00"


@pytest.mark.parametrize("body", [
    b"\x06\x16\x14\x01" + CONNECTED_B + b"\x00",  # ACM: not ours
    b"\x0c\x02\x00\x02\x80\x90",  # REL, cause normal clearing
    b"\xff",
])
def test_other_message_types_pass_unchanged(body: bytes) -> None:
    assert rewrite_isup(body, X) is body


def test_calling_number_in_iam_only() -> None:
    # a calling party number in an ANM is not a connected number: left alone
    anm = b"\x09\x01\x0a\x08\x83\x13" + A_BCD + b"\x00"
    assert rewrite_isup(anm, X) == anm


def test_bad_x_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        rewrite_isup(IAM_BODY, "+86700")


# ---- malformed ---------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [IAM_BODY, ANM_BODY, CON_BODY])
def test_every_truncation_is_an_isup_error(body: bytes) -> None:
    for size in range(len(body)):
        with pytest.raises(IsupError):
            rewrite_isup(body[:size], X)


@pytest.mark.parametrize("body,why", [
    (IAM_BODY[:6] + b"\x03" + IAM_BODY[7:], "pointer to called party number off by one"),
    (IAM_BODY[:6] + b"\xff" + IAM_BODY[7:], "pointer out of range"),
    (IAM_BODY[:7] + b"\xff" + IAM_BODY[8:], "optional pointer out of range"),
    (IAM_BODY[:7] + b"\x0b" + IAM_BODY[8:], "optional pointer inside the called number"),
    (IAM_BODY[:8] + b"\xff" + IAM_BODY[9:], "called number length overrun"),
    (IAM_BODY[:-1], "no end of optional parameters"),
    (IAM_BODY + b"\x00", "octets after the end"),
    (b"\x09\x01\x21\x09\x83\x03" + b"\x00" * 6, "optional parameter length overrun"),
    (b"\x09\x01\x21", "optional parameter without length"),
    (b"\x09\x00\x00", "octets after a message without optional part"),
    (b"\x09\x01\x21\x01\x83\x00", "connected number shorter than its indicators"),
    (b"\x01\x00\x60\x01\x0a\x03\x00\x00", "called party number pointer 0"),
    (b"", "empty"),
])
def test_malformed(body: bytes, why: str) -> None:
    with pytest.raises(IsupError):
        rewrite_isup(body, X)


def test_encode_refuses_what_does_not_fit() -> None:
    with pytest.raises(IsupError):
        IsupMessage(IAM, b"\x00" * 5, [b"\x00" * 254], []).encode()  # optional pointer 256
    with pytest.raises(IsupError):
        IsupMessage(ANM, b"", [], [(0x21, b"\x00" * 256)]).encode()
    with pytest.raises(IsupError):
        IsupMessage(CON, b"\x00\x00", [], [(0, b"")]).encode()


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_random_bytes_never_crash(data: bytes) -> None:
    for body in (data, b"\x01" + data, b"\x07" + data, b"\x09" + data):
        try:
            out = rewrite_isup(body, X)
        except IsupError:
            continue
        assert isinstance(out, bytes)


_params = st.lists(
    st.tuples(st.integers(1, 255), st.binary(min_size=3, max_size=12)), max_size=8
)


@settings(max_examples=300)
@given(
    st.binary(min_size=5, max_size=5),
    st.binary(min_size=2, max_size=20),
    _params,
    st.sampled_from([IAM, ANM, CON]),
)
def test_well_formed_messages_are_rewritten(
    fixed: bytes, called: bytes, params: list[tuple[int, bytes]], kind: int
) -> None:
    layout = {IAM: (fixed, [called]), ANM: (b"", []), CON: (fixed[:2], [])}[kind]
    body = IsupMessage(kind, layout[0], list(layout[1]), params).encode()
    assert parse_isup(body).encode() == body
    out = rewrite_isup(body, X)
    msg = parse_isup(out)
    assert msg.fixed == layout[0] and msg.variable == layout[1]
    assert msg.optional is not None
    targets = {
        IAM: {CALLING_PARTY_NUMBER: 0, REDIRECTING_NUMBER: 0, ORIGINAL_CALLED_NUMBER: 0,
              GENERIC_NUMBER: 1},
    }.get(kind, {CONNECTED_NUMBER: 0})
    assert len(msg.optional) == len(params)
    for (code, before), (code_after, after) in zip(params, msg.optional, strict=True):
        assert code == code_after
        lead = targets.get(code)
        if lead is None or len(before) <= lead + 2:
            assert after == before
        else:
            assert after[:lead] == before[:lead]
            assert decode_number_param(after[lead:]) == Number(3, before[lead + 1], X)
