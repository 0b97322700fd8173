"""Phone-number normalisation for China's numbering plan, 700 middle numbers included.

Phone-number libraries reject 700 numbers (with +86 they exceed E.164's 15 digits), so the rules
live here. Everything internal is *national format*: `13800000001`, `01012345678`,
`700100000000001`.
"""

from __future__ import annotations

import re
from typing import Final

# Visual separators allowed in tel: URIs (RFC 3966 visual-separator) and in dialled strings.
_SEPARATORS: Final = str.maketrans("", "", "-.() ")
_DIGITS: Final = re.compile(r"[0-9]{3,20}")


def normalize_number(text: str) -> str | None:
    """National-format digits for a dialled or presented number, or None if it is not one.

    Accepts `+86…`, `0086…`, `86…` (only where the rest is a mobile or a 700 number, so a
    national number that happens to start with 86 is left alone), `tel:` prefixes, `;params`
    and visual separators.
    """
    if text.startswith(("tel:", "TEL:", "Tel:")):
        text = text[4:]
    semi = text.find(";")
    if semi >= 0:
        text = text[:semi]
    text = text.translate(_SEPARATORS)
    international = False
    if text.startswith("+"):
        text = text[1:]
        if not text.startswith("86"):
            return None  # a foreign number has no national form
        text = text[2:]
        international = True
    elif text.startswith("0086"):
        text = text[4:]
        international = True
    if not _DIGITS.fullmatch(text):
        return None
    if international:
        if text[0] == "0":
            return text  # tolerate a redundant trunk prefix: +86 010 ...
        if (len(text) == 11 and text[0] == "1") or text.startswith(("700", "400", "800")):
            return text
        return "0" + text  # landline area code loses its trunk 0 in international form
    if text.startswith("86") and (
        (len(text) == 13 and text[2] == "1") or (len(text) == 17 and text.startswith("86700"))
    ):
        return text[2:]
    return text


def mask_number(number: str) -> str:
    """Mask the middle of a number for logs: `13800005678` → `138****5678`."""
    if len(number) <= 7:
        return "*" * len(number)
    return f"{number[:3]}{'*' * (len(number) - 7)}{number[-4:]}"


_NUMBER_LIKE: Final = re.compile(r"\d{7,}")  # long enough to be a phone number


def mask_numbers_in(text: str) -> str:
    """Free text for a log line (a parse error's reason, say): every run of 7 digits or more
    masked as mask_number does."""
    return _NUMBER_LIKE.sub(lambda m: mask_number(m.group()), text)


def is_mobile(number: str) -> bool:
    """True for an 11-digit national mobile number."""
    return len(number) == 11 and number[0] == "1" and number.isdigit()


def number_variants(national: str) -> tuple[str, ...]:
    """The forms a national number can take on the wire (for leak scanning)."""
    intl = national[1:] if national.startswith("0") else national
    return (national, "+86" + intl, "0086" + intl, "86" + intl)
