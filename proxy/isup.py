"""ISUP messages inside SIP-I bodies: put the middle number in every party number (ITU-T Q.763).

SIP-I trunks (ITU-T Q.1912.5; SIP-T, RFC 3204) carry the ISUP message the SIP message stands for as
an `application/isup` body, from the message type code on (no routing label, no CIC). Its numbers
are BCD, so the text scan of the privacy rewrite never sees them: the IAM's calling party number
(and redirecting, original called and generic numbers) would tell B who A is, the ANM/CON's
connected number would tell A who B is. This module rewrites those parameters to X and leaves
every other octet as it came. Sans-IO, stdlib only.

Parsing is strict: a message whose octets are not all accounted for by Q.763's layout (pointers
that do not point where the layout says, octets after the end of optional parameters) raises
IsupError, so a caller that cannot rewrite a message can drop it instead of passing on octets it
never looked at.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Final, NamedTuple

# Message type codes (Q.763 §2.1, Table 4)
IAM: Final = 0x01  # initial address
CON: Final = 0x07  # connect
ANM: Final = 0x09  # answer

# Parameter name codes (Q.763 §3.1, Table 5)
END_OF_OPTIONAL_PARAMETERS: Final = 0x00  # Q.763 §3.20
CALLED_PARTY_NUMBER: Final = 0x04  # Q.763 §3.9
CALLING_PARTY_NUMBER: Final = 0x0A  # Q.763 §3.10
REDIRECTING_NUMBER: Final = 0x0B  # Q.763 §3.44
CONNECTED_NUMBER: Final = 0x21  # Q.763 §3.16
ORIGINAL_CALLED_NUMBER: Final = 0x28  # Q.763 §3.39
GENERIC_NUMBER: Final = 0xC0  # Q.763 §3.26

# Nature of address indicator (Q.763 §3.9 b): national (significant) number
NAI_NATIONAL: Final = 3

# Q.763 clause 4 message formats we take apart: octets of the mandatory fixed part after the
# message type code, and how many mandatory variable parameters follow (each has a pointer).
#   IAM: nature of connection ind. (1), forward call ind. (2), calling party's category (1),
#        transmission medium requirement (1); called party number (V); optional part
#   CON: backward call indicators (2); optional part
#   ANM: optional part only
_LAYOUTS: Final[dict[int, tuple[int, int]]] = {IAM: (5, 1), CON: (2, 0), ANM: (0, 0)}

# The parameters that name a party, per message type; the value is how many octets come before
# the odd/even + nature of address octet (the generic number's number qualifier indicator).
_PARTY_NUMBERS: Final[dict[int, dict[int, int]]] = {
    IAM: {CALLING_PARTY_NUMBER: 0, ORIGINAL_CALLED_NUMBER: 0, REDIRECTING_NUMBER: 0,
          GENERIC_NUMBER: 1},
    CON: {CONNECTED_NUMBER: 0},
    ANM: {CONNECTED_NUMBER: 0},
}

_HEX_DIGITS: Final = "0123456789ABCDEF"
_DIGIT_VALUES: Final = {c: i for i, c in enumerate(_HEX_DIGITS)} | {
    c.lower(): i for i, c in enumerate(_HEX_DIGITS)
}


class IsupError(ValueError):
    """An ISUP message that does not follow Q.763 (truncated, bad pointer, length overrun …)."""


class Number(NamedTuple):
    """A decoded number parameter (Q.763 §3.9/§3.10 layout, without a generic number's NQI)."""

    nai: int  # nature of address indicator, 7 bits
    indicators: int  # the second octet as it is (NI/INN, numbering plan, presentation, screening)
    digits: str  # address signals, 0-9 and A-F (B, C = codes 11, 12; F = ST), filler dropped


@dataclass(slots=True)
class IsupMessage:
    """An IAM, CON or ANM split into its parts (Q.763 §1.4-§1.8)."""

    type: int
    fixed: bytes  # mandatory fixed part, after the message type code
    variable: list[bytes]  # mandatory variable parameters' contents (no length octet)
    optional: list[tuple[int, bytes]] | None  # (code, contents); None: pointer 0, no part

    def encode(self) -> bytes:
        """Wire octets; pointers recomputed (Q.763 §2.3), parameters laid out in order."""
        count = len(self.variable)
        pointers = bytearray()
        rest = bytearray()
        # pointer i sits i octets into the pointer block; what it points to sits after all
        # `count + 1` pointers and what went before; the value counts from the pointer itself
        for i, content in enumerate(self.variable):
            pointers.append(_octet(count + 1 + len(rest) - i, "pointer"))
            rest.append(_octet(len(content), "length"))
            rest += content
        if self.optional is None:
            pointers.append(0)
        else:
            pointers.append(_octet(1 + len(rest), "pointer to the optional part"))
            for code, content in self.optional:
                if code == END_OF_OPTIONAL_PARAMETERS:
                    raise IsupError("parameter code 0 is the end of optional parameters")
                rest.append(_octet(code, "parameter code"))
                rest.append(_octet(len(content), "length"))
                rest += content
            rest.append(END_OF_OPTIONAL_PARAMETERS)
        return bytes((self.type,)) + self.fixed + bytes(pointers) + bytes(rest)


def _octet(value: int, what: str) -> int:
    if not 0 <= value <= 255:
        raise IsupError(f"{what} {value} does not fit in an octet")
    return value


def parse_isup(data: bytes) -> IsupMessage:
    """Split an IAM, CON or ANM; IsupError for other types and for anything malformed.

    Q.763 §1.4: mandatory fixed part, then one pointer per mandatory variable parameter and the
    pointer to the optional part (§2.3: the value counts octets from the pointer itself to the
    parameter's length octet; 0 = no optional part), then the mandatory variable parameters
    (length octet + contents, §1.6), then the optional parameters (code, length, contents,
    §1.7) closed by the end of optional parameters octet (§1.8). Every octet must be where this
    layout puts it.
    """
    size = len(data)
    if not size:
        raise IsupError("empty ISUP body")
    kind = data[0]
    layout = _LAYOUTS.get(kind)
    if layout is None:
        raise IsupError(f"message type {kind:#04x} is not parsed here")
    fixed_len, count = layout
    first_pointer = 1 + fixed_len
    pos = first_pointer + count + 1  # first octet after the pointers
    if size < pos:
        raise IsupError("truncated before the end of the pointers")
    variable: list[bytes] = []
    for i in range(count):
        at = first_pointer + i
        if at + data[at] != pos:
            raise IsupError(f"pointer {i + 1} does not point after the previous parameter")
        if pos >= size:
            raise IsupError("truncated mandatory variable parameter")
        end = pos + 1 + data[pos]
        if end > size:
            raise IsupError("mandatory variable parameter runs past the end")
        variable.append(data[pos + 1:end])
        pos = end
    at = first_pointer + count
    if data[at] == 0:
        if pos != size:
            raise IsupError("octets after the mandatory part and no optional part")
        return IsupMessage(kind, data[1:first_pointer], variable, None)
    if at + data[at] != pos:
        raise IsupError("pointer to the optional part does not point after the mandatory part")
    optional: list[tuple[int, bytes]] = []
    while True:
        if pos >= size:
            raise IsupError("no end of optional parameters")
        code = data[pos]
        if code == END_OF_OPTIONAL_PARAMETERS:
            if pos + 1 != size:
                raise IsupError("octets after the end of optional parameters")
            return IsupMessage(kind, data[1:first_pointer], variable, optional)
        if pos + 1 >= size:
            raise IsupError(f"optional parameter {code:#04x} without a length")
        end = pos + 2 + data[pos + 1]
        if end > size:
            raise IsupError(f"optional parameter {code:#04x} runs past the end")
        optional.append((code, data[pos + 2:end]))
        pos = end


# ---- number parameters (Q.763 §3.9, §3.10, §3.16, §3.26, §3.39, §3.44) --------------------------

def encode_number_param(digits: str, nai: int, second_octet: int) -> bytes:
    """Contents of a number parameter: odd/even + NAI, the second octet as given, BCD signals.

    Q.763 §3.9 a) odd/even indicator (bit 8 of octet 1): 1 when the number of address signals is
    odd; e) address signals two per octet, the first in bits 4-1; f) a filler 0000 completes an
    odd count.
    """
    if not 0 <= nai <= 0x7F or not 0 <= second_octet <= 0xFF:
        raise ValueError("nature of address indicator or second octet out of range")
    odd, signals = _signals(digits)
    return bytes((odd << 7 | nai, second_octet)) + signals


@lru_cache(maxsize=256)  # the same few X values over and over
def _signals(digits: str) -> tuple[int, bytes]:
    if not digits:
        raise ValueError("a number needs at least one digit")
    try:
        values = [_DIGIT_VALUES[c] for c in digits]
    except KeyError:
        raise ValueError(f"not an address signal string: {digits[:40]!r}") from None
    odd = len(values) & 1
    if odd:
        values.append(0)  # filler
    signals = bytes(values[i] | values[i + 1] << 4 for i in range(0, len(values), 2))
    if len(signals) > 253:
        raise ValueError("too many digits for one parameter")
    return odd, signals


def decode_number_param(content: bytes) -> Number:
    """Read what encode_number_param writes; IsupError when it is malformed."""
    if len(content) < 2:
        raise IsupError("number parameter shorter than its two indicator octets")
    odd = content[0] >> 7
    signals = content[2:]
    if odd and not signals:
        raise IsupError("odd number of address signals but no address octet")
    digits = "".join(_HEX_DIGITS[b & 0x0F] + _HEX_DIGITS[b >> 4] for b in signals)
    if odd:
        digits = digits[:-1]  # filler
    return Number(content[0] & 0x7F, content[1], digits)


def _renumber(content: bytes, x: str, lead: int) -> bytes | None:
    """The parameter with its address signals replaced by `x`; None when it carries none."""
    if len(content) < lead + 2:
        raise IsupError("number parameter shorter than its indicator octets")
    if len(content) == lead + 2:
        # no address signals: "address not available" (Q.763 §3.10 d), nothing to hide
        return None
    return content[:lead] + encode_number_param(x, NAI_NATIONAL, content[lead + 1])


def _check_number(x: str) -> None:
    if not (x and x.isascii() and x.isdigit()):
        raise ValueError(f"not a national number: {x[:40]!r}")


def rewrite_isup_counted(
    data: bytes, x: str, *, called: str | None = None
) -> tuple[bytes, int]:
    """rewrite_isup, also returning how many number parameters were rewritten."""
    _check_number(x)
    if called is not None:
        _check_number(called)
    if not data:
        raise IsupError("empty ISUP body")
    if data[0] not in _LAYOUTS:
        return data, 0
    msg = parse_isup(data)
    count = 0
    targets = _PARTY_NUMBERS[msg.type]
    if msg.optional:
        rewritten: list[tuple[int, bytes]] = []
        for code, content in msg.optional:
            lead = targets.get(code)
            if lead is not None:
                new = _renumber(content, x, lead)
                if new is not None:
                    content = new
                    count += 1
            rewritten.append((code, content))
        msg.optional = rewritten
    if called is not None and msg.type == IAM:
        cdpn = msg.variable[0]
        digits = decode_number_param(cdpn).digits
        # an end-of-pulsing signal (ST, Q.763 §3.9 e) stays at the end
        new_digits = called + "F" if digits.endswith("F") else called
        msg.variable[0] = encode_number_param(new_digits, NAI_NATIONAL, cdpn[1])
        count += 1
    if not count:
        return data, 0
    return msg.encode(), count


def rewrite_isup(data: bytes, x: str, *, called: str | None = None) -> bytes:
    """Put `x` (national format) in every party number of an IAM, ANM or CON.

    IAM: calling party, original called, redirecting and generic numbers; ANM, CON: connected
    number. Each becomes nature of address "national (significant) number" with `x`'s digits;
    its other indicators (NI/INN, numbering plan, presentation, screening; a generic number's
    qualifier) stay. A parameter without address signals (address not available) is left as it
    is. The called party number is left alone unless `called` is given (the real number of the
    callee, when the next switch routes on the IAM rather than the Request-URI). Other message
    types come back unchanged. Raises IsupError when the message is malformed, ValueError when
    `x` or `called` is not a digit string.
    """
    return rewrite_isup_counted(data, x, called=called)[0]
