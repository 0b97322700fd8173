"""NumberScanner: every wire form of a number, found and replaced; nothing else touched.

The property tests compare the scanner with `oracle_replace`, a slow byte-by-byte reading of the
rule in proxy/scanner.py's docstring written independently of its regexes.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.scanner import NumberScanner

B = "13900000001"
LANDLINE = "01012345678"
X = b"700100000000001"


def fw(text: str) -> bytes:
    """Full-width form of ASCII digits, `+`, `-`, `(`, `)` and space (ideographic space)."""
    out = []
    for ch in text:
        if ch == " ":
            out.append("\u3000")
        elif ch.isdigit() or ch in "+-()":
            out.append(chr(ord(ch) + 0xFEE0))
        else:
            out.append(ch)
    return "".join(out).encode()


def pct(text: str) -> bytes:
    return "".join(f"%{ord(ch):02X}" for ch in text).encode()


def scrub(data: bytes, national: str = B) -> tuple[bytes, int]:
    return NumberScanner(national).replace(data, X)


# ---- every form is found --------------------------------------------------------------------

@pytest.mark.parametrize("form", [
    b"13900000001",
    b"+8613900000001",
    b"008613900000001",
    b"8613900000001",
    b"+86 139 0000 0001",
    b"+86-139-0000-0001",
    b"+ 86 13900000001",
    b"+(86) 139-0000-0001",
    b"0086-139-0000-0001",
    b"0086 13900000001",
    b"86 139 0000 0001",
    b"139 0000 0001",
    b"139-0000-0001",
    b"139.0000.0001",
    b"139 - 0000 - 0001",
    b"1 3 9 0 0 0 0 0 0 0 1",
])
def test_plain_forms_are_replaced_whole(form: bytes) -> None:
    scanner = NumberScanner(B)
    data = b"<sip:" + form + b"@10.0.0.1>"
    assert scanner.present(data)
    assert scanner.replace(data, X) == (b"<sip:" + X + b"@10.0.0.1>", 1)


def test_the_plus_and_first_unit_start_the_span_brackets_before_them_stay() -> None:
    assert scrub(b"(139) 0000.0001;x") == (b"(" + X + b";x", 1)
    assert scrub(b"x (+86)13900000001") == (b"x (" + X, 1)
    assert scrub(b"x (+86) 139-0000-0001") == (b"x (" + X, 1)
    assert scrub(b"tel:+86-139-0000-0001;ext=+86") == (b"tel:" + X + b";ext=+86", 1)


@pytest.mark.parametrize("form", [
    pct("13900000001"),
    pct("+8613900000001"),
    b"%2B86%31%33%39%30%30%30%30%30%30%30%31",
    b"%2b8613900000001",
    b"%2B86%20139%2D0000%2E0001",
    b"139%2d0000%2e0001",
    b"%28139%29%2000000001",
    b"%31%339%30000%30001",
    b"0086%2D13900000001",
])
def test_percent_escaped_forms(form: bytes) -> None:
    data = b"sip:" + form + b"@h"
    scanner = NumberScanner(B)
    assert scanner.present(data)
    new, n = scanner.replace(data, X)
    assert n == 1 and new.endswith(X + b"@h") and b"sip:" in new


def test_percent_escaped_display_parenthesis_stays() -> None:
    assert scrub(b"sip:%28139%29%2000000001@h") == (b"sip:%28" + X + b"@h", 1)


@pytest.mark.parametrize("form", [
    fw("13900000001"),
    fw("+86 139 0000 0001"),
    fw("(+86)139-0000-0001"),
    fw("139") + b"-0000-" + fw("0001"),
    b"+86" + fw("139") + b"00000001",
    fw("+86") + b" 139 " + fw("0000") + b"\xe3\x80\x800001",
    fw("139") + b"%2D0000" + fw("-") + b"%30001",
])
def test_full_width_forms_mixed_with_ascii(form: bytes) -> None:
    data = b'"' + form + b'" <sip:a@h>'
    scanner = NumberScanner(B)
    assert scanner.present(data)
    new, n = scanner.replace(data, X)
    assert n == 1 and new.endswith(X + b'" <sip:a@h>'), new


@pytest.mark.parametrize(("data", "expected"), [
    (b'From: "139 0000 0001" <sip:a@h>;tag=1', b'From: "' + X + b'" <sip:a@h>;tag=1'),
    (b"SIP/2.0 180 Ringing 13900000001", b"SIP/2.0 180 Ringing " + X),
    (b"SIP/2.0 486 13900000001 busy", b"SIP/2.0 486 " + X + b" busy"),
    (b"o=13900000001 2890844526 2890842807 IN IP4 10.47.16.5",
     b"o=" + X + b" 2890844526 2890842807 IN IP4 10.47.16.5"),
    (b"o=- 13900000001 0 IN IP4 1.2.3.4", b"o=- " + X + b" 0 IN IP4 1.2.3.4"),
    (b"abc13900000001xyz", b"abc" + X + b"xyz"),
    (b"INVITE sip:13900000001@h SIP/2.0", b"INVITE sip:" + X + b"@h SIP/2.0"),
    (b"Call-ID: 13900000001@h", b"Call-ID: " + X + b"@h"),
])
def test_found_anywhere(data: bytes, expected: bytes) -> None:
    assert scrub(data) == (expected, 1)


def test_several_occurrences_and_forms_in_one_message() -> None:
    data = (b"INVITE sip:+8613900000001@h SIP/2.0\r\n"
            b'From: "139 0000 0001" <sip:%2B86%3139%300000001@h>\r\n'
            b"\r\n"
            b"o=" + fw("13900000001") + b" 1 1 IN IP4 139.0.0.1\r\n")
    new, n = scrub(data)
    assert n == 4
    assert new == (b"INVITE sip:" + X + b"@h SIP/2.0\r\n"
                   b'From: "' + X + b'" <sip:' + X + b"@h>\r\n"
                   b"\r\n"
                   b"o=" + X + b" 1 1 IN IP4 139.0.0.1\r\n")
    assert not NumberScanner(B).present(new)


def test_landline_forms() -> None:
    for form in (b"01012345678", b"010-1234-5678", b"010 12345678", b"+86 10 1234 5678",
                 b"+861012345678", b"0086 10 12345678", b"8610 12345678", b"1012345678",
                 pct("01012345678"), fw("010-1234-5678")):
        assert scrub(b"<tel:" + form + b">", LANDLINE) == (b"<tel:" + X + b">", 1), form
    # a redundant trunk 0 after +86 is not a form, but the national number in it is found
    assert scrub(b"+86 010 1234 5678", LANDLINE) == (b"+86 " + X, 1)


# ---- and nothing else -------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"139000000012",  # one longer unit
    b"113900000001",
    b"2013900000001",
    b"sip:139000000012@h",
    b"1390000000",  # a digit short
    b"139 0000 000",
    b"c=IN IP4 139.0.0.1",
    b"139.0.0.1:5060",
    b"%3113900000001",  # %31 is a digit: 113900000001
    fw("139000000012"),
    b"1 139 0000 00012",
    b"13900000001".replace(b"0", b"o"),
])
def test_not_an_occurrence(data: bytes) -> None:
    new, n = scrub(data)
    assert n == 0 and new is data


def test_letters_end_a_run_but_do_not_join_digits() -> None:
    assert scrub(b"139a00000001") == (b"139a00000001", 0)
    assert scrub(b"139/0000/0001") == (b"139/0000/0001", 0)  # `/` is not a separator


def test_x_itself_never_matches_a_hidden_number_inside_it() -> None:
    data = b"To: <sip:700100000000001@10.0.0.1>;tag=1"
    for hidden in ("10000000000", "00100000000", "01000000000", "70010000000"):
        scanner = NumberScanner(hidden)
        new, n = scanner.replace(data, X)
        assert n == 0 and new is data


def test_clean_message_is_returned_as_is() -> None:
    data = b"INVITE sip:700100000000001@h SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9\r\n\r\n"
    scanner = NumberScanner(B)
    assert not scanner.present(data)
    new, n = scanner.replace(data, X)
    assert n == 0 and new is data


def test_other_percent_escapes_are_read_both_ways() -> None:
    # as an escape: `%23` is `#`, `%40` is `@`, so the number follows an "other" character
    assert scrub(b"sip:%2331%2313900000001@h") == (b"sip:%2331%23" + X + b"@h", 1)
    assert scrub(b"%4013900000001") == (b"%40" + X, 1)
    # as text: what a display shows for a `%` that is no escape
    assert scrub(b'"100%13900000001"') == (b'"100%' + X + b'"', 1)
    assert scrub(b"%E4%B8%AD13900000001") == (b"%E4%B8%AD" + X, 1)
    # and %31 is a digit whichever way: `%313900000001` is the number itself
    assert scrub(b"%313900000001") == (X, 1)


def test_bad_numbers_are_refused() -> None:
    for bad in ("", "1", "+8613900000001", "139 0000 0001", "１３９"):
        with pytest.raises(ValueError):
            NumberScanner(bad)


def test_hostile_inputs_stay_linear() -> None:
    scanner = NumberScanner(B)
    cases = [
        b"1 " * 32768,
        b"+ " * 32768,
        b"%31" * 20000,
        b"%2" * 30000,
        b"\xef\xbc" * 30000,
        (b"13900000001 " * 5000)[:-1],
        b"(" * 30000 + b"13900000001",
        (b"+86 139 0000 0001;" * 3000),
        (b"1" + b" " * 100) * 600 + b"3900000001",
    ]
    for data in cases:
        t0 = time.perf_counter()
        scanner.present(data)
        scanner.replace(data, X)
        assert time.perf_counter() - t0 < 2.0, data[:20]
    assert scanner.replace((b"13900000001 " * 5000)[:-1], X)[1] == 5000
    assert scanner.replace(b"+86 139 0000 0001;" * 3000, X) == ((X + b";") * 3000, 3000)


# ---- the reference reading of the rule ------------------------------------------------------

_HEX = b"0123456789ABCDEFabcdef"
_DIGIT_TOKENS = {b"%3" + bytes([c]): bytes([c]) for c in b"0123456789"}
_DIGIT_TOKENS.update({bytes([0xEF, 0xBC, 0x90 + d]): b"%d" % d for d in range(10)})
_SEP_TOKENS = {b"%20", b"%2D", b"%2d", b"%2E", b"%2e", b"%28", b"%29",
               b"\xef\xbc\x8d", b"\xef\xbc\x88", b"\xef\xbc\x89", b"\xe3\x80\x80"}
_PLUS_TOKENS = {b"%2B", b"%2b", b"\xef\xbc\x8b"}


def _token(data: bytes, i: int, escapes: bool) -> tuple[str, int, bytes]:
    """The token at `i`: kind (Digit, Separator, Plus, Other), length, digit."""
    c, three = data[i], data[i:i + 3]
    if 0x30 <= c <= 0x39:
        return "D", 1, bytes([c])
    if three in _DIGIT_TOKENS:
        return "D", 3, _DIGIT_TOKENS[three]
    if c in b" -.()":
        return "S", 1, b""
    if three in _SEP_TOKENS:
        return "S", 3, b""
    if c == 0x2B:
        return "P", 1, b""
    if three in _PLUS_TOKENS:
        return "P", 3, b""
    if escapes and c == 0x25 and len(three) == 3 and three[1] in _HEX and three[2] in _HEX:
        return "O", 3, b""
    return "O", 1, b""


def _tokens(data: bytes, escapes: bool):
    i = 0
    while i < len(data):
        kind, size, digit = _token(data, i, escapes)
        yield kind, i, i + size, digit
        i += size


def _runs(data: bytes, escapes: bool):
    """Runs as (plus start or None, [[start, end, digits], ...])."""
    runs, run, unit_open, plus = [], None, False, None
    for kind, start, end, digit in _tokens(data, escapes):
        if kind == "D":
            if unit_open:
                run[1][-1][1] = end
                run[1][-1][2] += digit
            else:
                if run is None:
                    run = (plus, [])
                    runs.append(run)
                    plus = None
                run[1].append([start, end, digit])
            unit_open = True
            continue
        unit_open = False
        if kind == "P":
            run, plus = None, start
        elif kind == "O":
            run, plus = None, None
    return runs


def _oracle_pass(data: bytes, national: str, x: bytes, escapes: bool) -> tuple[bytes, int]:
    intl = national[1:] if national.startswith("0") else national
    forms = {f.encode() for f in (national, intl, "86" + intl, "0086" + intl)}
    spans = []
    for plus, units in _runs(data, escapes):
        i = 0
        while i < len(units):
            best = None
            for j in range(i, len(units)):
                if b"".join(u[2] for u in units[i:j + 1]) in forms:
                    best = j
            if best is None:
                i += 1
                continue
            start = plus if i == 0 and plus is not None else units[i][0]
            spans.append((start, units[best][1]))
            i = best + 1
    out, pos = b"", 0
    for start, end in spans:
        out += data[pos:start] + x
        pos = end
    return out + data[pos:], len(spans)


def oracle_replace(data: bytes, national: str, x: bytes) -> tuple[bytes, int]:
    """Occurrences with %HH read as escapes, then (in what is left) read as text."""
    out, n = _oracle_pass(data, national, x, escapes=True)
    out, m = _oracle_pass(out, national, x, escapes=False)
    return out, n + m


def test_oracle_agrees_on_examples() -> None:
    assert oracle_replace(b"a +86 139-0000-0001 b", B, X) == (b"a " + X + b" b", 1)
    assert oracle_replace(b"%2331%2313900000001", B, X) == (b"%2331%23" + X, 1)
    assert oracle_replace(b"139000000012", B, X) == (b"139000000012", 0)


# ---- properties -------------------------------------------------------------------------------

NATIONALS = [B, "18612345678", LANDLINE, "02087654321", "08686868686", "13686013686"]
_SEPS = [b" ", b"-", b".", b"(", b")", b"%20", b"%2D", b"%2d", b"%2E", b"%28", b"%29",
         b"\xef\xbc\x8d", b"\xef\xbc\x88", b"\xef\xbc\x89", b"\xe3\x80\x80"]
_PLUSES = [b"+", b"%2B", b"%2b", b"\xef\xbc\x8b"]


def _digit(d: str) -> st.SearchStrategy[bytes]:
    return st.sampled_from([d.encode(), b"%3" + d.encode(), bytes([0xEF, 0xBC, 0x90 + int(d)])])


@st.composite
def wire_forms(draw: st.DrawFn, national: str) -> bytes:
    """One occurrence of `national` in a random form, spelling and split."""
    intl = national[1:] if national.startswith("0") else national
    form = draw(st.sampled_from([national, intl, "86" + intl, "0086" + intl]))
    out = b""
    if draw(st.booleans()):
        out += draw(st.sampled_from(_PLUSES))
        out += b"".join(draw(st.lists(st.sampled_from(_SEPS), max_size=2)))
    for k, d in enumerate(form):
        if k and draw(st.integers(0, 3)) == 0:
            out += b"".join(draw(st.lists(st.sampled_from(_SEPS), min_size=1, max_size=2)))
        out += draw(_digit(d))
    return out


# fillers: no digit, separator, plus, `%` or full-width form: they end runs
_FILLER = st.lists(st.sampled_from(
    [b"a", b"z", b"Q", b";", b"@", b":", b"<", b">", b'"', b"=", b"\r\n", b"\n", b"sip:",
     b"tag=", b"\xe4\xb8\xad", b"/", b",", b"\t"]), min_size=1, max_size=4).map(b"".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), national=st.sampled_from(NATIONALS))
def test_embedded_forms_are_all_found_and_removed(data: st.DataObject, national: str) -> None:
    forms = data.draw(st.lists(wire_forms(national), min_size=1, max_size=5))
    fillers = data.draw(st.lists(_FILLER, min_size=len(forms) + 1, max_size=len(forms) + 1))
    message = fillers[0] + b"".join(f + g for f, g in zip(forms, fillers[1:], strict=True))
    scanner = NumberScanner(national)
    assert scanner.present(message)
    new, n = scanner.replace(message, X)
    assert n == len(forms)
    assert oracle_replace(new, national, X) == (new, 0)
    intl = national[1:] if national.startswith("0") else national
    assume(intl not in (X * len(forms)).decode())
    assert not scanner.present(new)
    assert scanner.replace(new, X) == (new, 0)


_SOUP = st.sampled_from(
    [b"0", b"1", b"3", b"6", b"8", b"9", b"00", b"86", b"139", b"0000", b"0001",
     b" ", b"-", b".", b"(", b")", b"+", b"%2B", b"%2b", b"%20", b"%2D", b"%2e", b"%28",
     b"%31", b"%33", b"%39", b"%30", b"%3A", b"%40", b"%23", b"%13", b"%1", b"%3", b"%", b"%2",
     b"\xef\xbc\x91", b"\xef\xbc\x90", b"\xef\xbc\x8b", b"\xef\xbc\x8d", b"\xef\xbc", b"\xef",
     b"\xe3\x80\x80", b"\xe3\x80", b"a", b"B", b"e", b";", b"@", b"\n", b"\r\n", b'"', b"<",
     b"\xe4\xb8\xad", X])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), national=st.sampled_from(NATIONALS))
def test_scanner_matches_the_reference_reading(data: st.DataObject, national: str) -> None:
    pieces = data.draw(st.lists(st.one_of(_SOUP, wire_forms(national)), max_size=24))
    message = b"".join(pieces)
    scanner = NumberScanner(national)
    expected = oracle_replace(message, national, X)
    new, n = scanner.replace(message, X)
    assert (new, n) == expected
    if n:
        assert scanner.present(message)
    else:
        assert new is message
    assert oracle_replace(new, national, X) == (new, 0)


@settings(max_examples=200, deadline=None)
@given(message=st.binary(max_size=200), national=st.sampled_from(NATIONALS))
def test_arbitrary_bytes_agree_with_the_reference(message: bytes, national: str) -> None:
    assert NumberScanner(national).replace(message, X) == oracle_replace(message, national, X)


# plain ASCII without `%`: replace() reads only the chunks around the intl digits written
# together (_replace_ascii), and must still agree with the reference everywhere
_ASCII_SOUP = st.sampled_from(
    [b"0", b"1", b"3", b"6", b"8", b"9", b"00", b"86", b"139", b"0000", b"0001", b"13900000001",
     b"8613900000001", b"18612345678", b"2087654321", b" ", b"-", b".", b"(", b")", b"+",
     b"a", b"B", b"e", b"F", b"o=", b";", b"@", b"\n", b"\r\n", b'"', b"<", b"sip:", X])


@st.composite
def ascii_wire_forms(draw: st.DrawFn, national: str) -> bytes:
    """One occurrence of `national`, ASCII spellings only, sometimes split by separators."""
    intl = national[1:] if national.startswith("0") else national
    form = draw(st.sampled_from([national, intl, "86" + intl, "0086" + intl]))
    out = draw(st.sampled_from([b"", b"", b"+", b"+ "]))
    for k, d in enumerate(form):
        if k and draw(st.integers(0, 5)) == 0:
            out += draw(st.sampled_from([b" ", b"-", b".", b"(", b")", b" - "]))
        out += d.encode()
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), national=st.sampled_from(NATIONALS))
def test_plain_ascii_messages_agree_with_the_reference(data: st.DataObject, national: str
                                                       ) -> None:
    pieces = data.draw(st.lists(st.one_of(_ASCII_SOUP, ascii_wire_forms(national)),
                                max_size=30))
    message = b"".join(pieces)
    assert message.isascii() and b"%" not in message
    scanner = NumberScanner(national)
    assert scanner.replace(message, X) == oracle_replace(message, national, X)


def test_plain_ascii_shortcut_leaves_split_forms_to_the_general_reading() -> None:
    """A form written together and one split by separators in the same message: both go, the
    second by the general reading after the shortcut finds one left (present())."""
    scanner = NumberScanner(B)
    message = b"o=" + B.encode() + b" 1 2 IN IP4 h\r\ni=+86 139-0000-0001 x\r\n"
    assert scanner.replace(message, X) == (b"o=" + X + b" 1 2 IN IP4 h\r\ni=" + X + b" x\r\n", 2)
    # written together but inside a longer unit: not an occurrence, nothing replaced
    longer = b"id=9" + B.encode() + b"7\r\n"
    assert scanner.replace(longer, X) == (longer, 0)
    # the SDP shape: the number, then digits joined by spaces in the same run
    sdp = b"v=0\r\no=" + B.encode() + b" 53655765 2353687637 IN IP4 127.0.0.1\r\n"
    assert scanner.replace(sdp, X) == (sdp.replace(B.encode(), X), 1)


def test_the_ascii_chunk_set_is_the_chunk_class_read_on_ascii_without_percent() -> None:
    """_ASCII_CHUNK_SET is written out by hand beside the _CHUNK_BYTES regex class: they must
    agree on every ASCII byte but `%` (the shortcut only reads such messages)."""
    import re

    from proxy.scanner import _ASCII_CHUNK_SET, _CHUNK_BYTES

    chunk = re.compile(_CHUNK_BYTES)
    for byte in range(128):
        if byte == ord("%"):
            continue
        assert (chunk.fullmatch(bytes((byte,))) is not None) == (byte in _ASCII_CHUNK_SET), byte
