"""Find and replace every wire form of one phone number in raw SIP bytes (sans-IO, stdlib only).

The last line of defence of the privacy rewrite: whatever a header parser missed (a display
name, a reason phrase, an SDP `o=` user, an escaped URI), this finds.

The rule. The bytes are read as a sequence of *tokens*:

- digit: ASCII `0`-`9`, `%30`-`%39`, full-width `０`-`９` (UTF-8 EF BC 90-99);
- separator (RFC 3966 visual separators): space `-` `.` `(` `)`, `%20 %2D %2E %28 %29`
  (either case), full-width `－` `（` `）` (EF BC 8D/88/89), ideographic space (E3 80 80);
- plus: `+`, `%2B` (either case), full-width `＋` (EF BC 8B);
- anything else (a letter, `@`, `;`, any other `%HH` escape, any other byte) is *other*.

A *unit* is a maximal run of adjacent digit tokens; units joined only by separators form a
*run* (other and plus tokens end a run). An *occurrence* is a sequence of consecutive units of
one run whose digits, concatenated, equal one of the forms national, intl, `86`+intl or
`0086`+intl (intl is the national number without its leading 0), optionally with a plus just
before its first unit (separators may stand in between). Units are atomic: `139000000012` does
not contain `13900000001`, so neither does the middle number X nor an IP address `139.0.0.1`;
letters end a run but do not prevent a match: `abc13900000001xyz` matches. Within a run the
earliest unit that starts an occurrence wins, and the longest occurrence from it (so `+86 139
0000 0001` is one occurrence, from the `+`). The span from the plus (or first unit) to the end
of the last unit is replaced.

Other `%HH` escapes are read both ways and a match under either counts: as escapes (`%23` is
`#`, so `%2313900000001` is `#` then the number; `%HH` is one "other" token) and as text (`%`
then digits: `%13900000001` is what a display shows). replace() does the escape reading, then
the text reading over what is left. `x` must not itself hold an occurrence (X does not).

`present()` is the per-message fast path: every occurrence contains the intl digits
contiguously once separators and other bytes are deleted, so deleting every non-digit byte
(one `bytes.translate`) and searching for them is a superset test; when a `%` or a full-width
lead byte (EF) is there, our %-tokens and full-width digits are decoded first (a slower path).
replace() narrows down the same way (halves at line ends, then chunks of token bytes, then runs)
so that its regexes and Python logic only see the few runs that may hold an occurrence.

Two shortcuts for the usual message, where a number is written with its digits together
(`o=13900000001 …`, `<sip:13900000001@…>`): present() first looks for the intl digits as they
are, before deleting anything; and replace() on plain ASCII without `%` reads only the chunks
around those digits, then checks with present() that nothing is left (else the general reading
runs). Measured with callgrind (`scripts/bench_core.py 300 --rounds 1 --bindings 1000`): the
core's instructions a call 1,223 K -> 1,119 K with numbers in Contact and SDP, 833 K -> 840 K
with the shared harness's rows (no number there: every present() is a miss).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

__all__ = ["NumberScanner"]

_DIG: Final = rb"(?:[0-9]|%3[0-9]|\xef\xbc[\x90-\x99])"
_SEP: Final = rb"(?:[ \-.()]|%2[0DdEe89]|\xef\xbc[\x88\x89\x8d]|\xe3\x80\x80)"
_PLUS: Final = rb"(?:\+|%2[Bb]|\xef\xbc\x8b)"
# %-tokens of ours (digits, separators, plus) and, for the escape reading, any %HH escape:
# consumed whole when they start no run, so a search never resumes in the middle of one.
_OUR_PCT: Final = rb"%(?:3[0-9]|2[0BbDdEe89])"
_ANY_PCT: Final = rb"%[0-9A-Fa-f]{2}"

# Bytes that can be part of a digit, separator or plus token, or of any %HH escape. Any other
# byte is a one-byte "other" token, so a maximal *chunk* of these bytes starts and ends on token
# boundaries and holds whole runs: replace() looks at runs only inside chunks that can hold an
# occurrence (as long as the intl number, whose digits every occurrence contains).
_CHUNK_BYTES: Final = rb"[0-9A-Fa-f \-.()+%\x80\x88\x89\x8b\x8d\x90-\x99\xbc\xe3\xef]"
# A run with the plus before it. The %-escape alternatives consume the escapes that start no run
# (any %HH when escapes are read as such, ours only when read literally), so the search never
# resumes inside one; the literal reading lets an ASCII digit inside any other escape start a
# unit (`%13900000001`).
_RUN: Final = (
    rb"(?P<run>(?P<plus>" + _PLUS + _SEP + rb"*)?"
    + _DIG + rb"+(?:" + _SEP + rb"+" + _DIG + rb"+)*)"
)
_RUNS_ESCAPED: Final = re.compile(_RUN + rb"|" + _ANY_PCT)
_RUNS_LITERAL: Final = re.compile(_RUN + rb"|" + _OUR_PCT)
# Splits a run (from its first unit) into units and separators.
_UNIT: Final = re.compile(rb"(" + _DIG + rb"+)|" + _SEP)
# The same for the common chunk: plain ASCII, no `%` (simple classes run much faster in `re`).
_ASCII_RUNS: Final = re.compile(rb"(?P<run>(?P<plus>\+[ \-.()]*)?[0-9]+(?:[ \-.()]+[0-9]+)*)")
_ASCII_UNIT: Final = re.compile(rb"([0-9]+)")
# Decodes our %-tokens and full-width digits (separators and plus become nothing).
_NORM: Final = re.compile(_OUR_PCT + rb"|\xef\xbc[\x90-\x99]")
_NORM_MAP: Final[dict[bytes, bytes]] = {}
for _d in range(10):
    _NORM_MAP[b"%%3%d" % _d] = _NORM_MAP[bytes((0xEF, 0xBC, 0x90 + _d))] = b"%d" % _d
for _c in b"0BbDdEe89":
    _NORM_MAP[b"%2" + bytes((_c,))] = b""
# the chunk bytes (_CHUNK_BYTES) of a plain ASCII message without `%`
_ASCII_CHUNK_SET: Final = frozenset(b"0123456789ABCDEFabcdef -.()+")
_NON_DIGITS: Final = bytes(sorted(set(range(256)) - set(b"0123456789")))
# Deleting these keeps the digits, `%` and 0xEF (the lead byte of full-width forms): if neither
# of the last two survives, what is left is the plain digit projection.
_NON_DIGITS_KEEP_MARKS: Final = bytes(sorted(set(_NON_DIGITS) - set(b"%\xef")))
_PERCENT: Final = 0x25  # "%"
_EF: Final = 0xEF  # the lead byte of the full-width forms


_SHORT: Final = 160  # replace(): below this many bytes, a regex over a stretch beats halving it
_CHUNKS: Final[dict[int, re.Pattern[bytes]]] = {}


def _chunks(min_len: int) -> re.Pattern[bytes]:
    """Chunks of at least `min_len` bytes (shorter ones cannot hold `min_len` digits)."""
    pattern = _CHUNKS.get(min_len)
    if pattern is None:
        pattern = _CHUNKS[min_len] = re.compile(_CHUNK_BYTES + rb"{%d,}" % min_len)
    return pattern


def _normalise(data: bytes) -> bytes:
    """`data` with our %-tokens and full-width digits decoded (separators and plus removed)."""
    return _NORM.sub(lambda m: _NORM_MAP[m.group()], data)


class NumberScanner:
    """Finds every wire form of one national number."""

    __slots__ = ("_forms", "_intl", "_intl_text", "_maxlen", "_national")

    def __init__(self, national: str) -> None:
        if not national.isascii() or not national.isdigit() or len(national) < 2:
            raise ValueError(f"not a national number: {national!r}")
        self._national = national.encode()
        self._intl = self._national[1:] if national[0] == "0" else self._national
        self._intl_text = self._intl.decode("ascii")
        self._forms: tuple[bytes, ...] = ()  # built by the first replace() that needs them
        self._maxlen = 0

    def present(self, data: bytes) -> bool:
        """Fast superset check: True whenever replace() would find something (false positives
        allowed, false negatives never)."""
        # `str in str` and int membership, not `bytes in bytes`: CPython 3.11 tries that
        # operand as an integer first and formats (then clears) a TypeError each time, several
        # times the cost of the search; and compiled, decode and `str in str` are C calls,
        # while `bytes.find` is a call by name
        if self._intl_text in data.decode("latin-1"):
            return True  # written together, the usual way: no need to drop the rest first
        digits = data.translate(None, _NON_DIGITS_KEEP_MARKS)
        if self._intl_text in digits.decode("latin-1"):
            return True
        if _PERCENT not in digits and _EF not in digits:
            return False  # `digits` is every digit of `data`, in order: the intl is not there
        return _normalise(data).translate(None, _NON_DIGITS).find(self._intl) >= 0

    def replace(self, data: bytes, x: bytes) -> tuple[bytes, int]:
        """`data` with every occurrence replaced by `x`; and how many."""
        if not self.present(data):
            return data, 0
        if not self._forms:
            intl = self._intl
            self._forms = tuple({self._national, intl, b"86" + intl, b"0086" + intl})
            self._maxlen = max(map(len, self._forms))
        if _PERCENT not in data and data.isascii() and _PERCENT not in x:
            quick = self._replace_ascii(data, x)
            if quick is not None:
                return quick
        out, count = self._replace(data, x, literal=False)
        if _PERCENT in out:  # the literal reading of %HH escapes differs only where there are some
            out, more = self._replace(out, x, literal=True)
            count += more
        return (out, count) if count else (data, 0)

    # ---- internals ---------------------------------------------------------------------------

    def _replace(self, data: bytes, x: bytes, literal: bool) -> tuple[bytes, int]:
        parts: list[bytes] = []
        pos = 0
        for start, end in self._spans(data, literal):
            parts.append(data[pos:start])
            parts.append(x)
            pos = end
        if not parts:
            return data, 0
        parts.append(data[pos:])
        return b"".join(parts), len(parts) // 2

    def _replace_ascii(self, data: bytes, x: bytes) -> tuple[bytes, int] | None:
        """replace() for the common message: plain ASCII, no `%`, the number's intl digits
        written together (`o=13900000001 …`, `<sip:+8613900000001@…>`). Only the chunks around
        those places are read, with the general reading's own steps (_ascii_chunk_spans), and
        chunks are independent, so what it replaces there is what replace() would. None (the
        general reading then runs) when that finds nothing, or when the result still passes
        present(): an occurrence split by separators, or one elsewhere, may be left."""
        intl = self._intl
        n = len(data)
        parts: list[bytes] = []
        pos = 0
        at = data.find(intl)
        while at >= 0:
            lo = at
            while lo > 0 and data[lo - 1] in _ASCII_CHUNK_SET:
                lo -= 1
            hi = at + len(intl)
            while hi < n and data[hi] in _ASCII_CHUNK_SET:
                hi += 1
            for start, end in self._ascii_chunk_spans(data, lo, hi):
                parts.append(data[pos:start])
                parts.append(x)
                pos = end
            at = data.find(intl, hi)
        if not parts:
            return None
        count = len(parts) // 2
        parts.append(data[pos:])
        out = b"".join(parts)
        if self.present(out):
            return None
        return out, count

    def _ascii_chunk_spans(self, data: bytes, lo: int, hi: int) -> list[tuple[int, int]]:
        """Occurrence spans in the plain ASCII chunk data[lo:hi], as _spans reads one (which
        also asks present() of the whole chunk first: true here, it holds the intl digits)."""
        spans: list[tuple[int, int]] = []
        present = self.present
        for m in _ASCII_RUNS.finditer(data, lo, hi):
            if m.start("run") >= 0 and present(m.group()):
                spans.extend(self._in_run(data, m, _ASCII_UNIT))
        return spans

    def _spans(self, data: bytes, literal: bool) -> Iterator[tuple[int, int]]:
        """Occurrence spans, in order: stretches of lines, chunks, then runs that may hold one.
        `literal`: read %HH escapes as text (only chunks with a `%` can differ from the first
        reading, which has replaced everything else already)."""
        present = self.present
        chunks = _chunks(len(self._intl))
        for lo, hi in self._stretches(data):
            for chunk in chunks.finditer(data, lo, hi):
                text = chunk.group()
                if _PERCENT in text:
                    runs, units = (_RUNS_LITERAL if literal else _RUNS_ESCAPED), _UNIT
                elif literal:
                    continue
                elif text.isascii():
                    runs, units = _ASCII_RUNS, _ASCII_UNIT
                else:
                    runs, units = _RUNS_ESCAPED, _UNIT
                if not present(text):
                    continue
                for m in runs.finditer(data, chunk.start(), chunk.end()):
                    if m.start("run") >= 0 and present(m.group()):
                        yield from self._in_run(data, m, units)

    def _stretches(self, data: bytes) -> list[tuple[int, int]]:
        """Short stretches of `data` that may hold an occurrence, in order, found by halving at
        line ends (no occurrence spans one): a few translate() calls instead of a regex over all."""
        present = self.present
        found: list[tuple[int, int]] = []
        todo = [(0, len(data))]
        while todo:
            lo, hi = todo.pop()
            if hi - lo > _SHORT:
                half = (lo + hi) // 2
                mid = data.find(b"\n", half, hi)
                if mid < 0:
                    mid = data.rfind(b"\n", lo, half)
                if mid >= 0:
                    if present(data[mid + 1:hi]):
                        todo.append((mid + 1, hi))
                    if present(data[lo:mid]):
                        todo.append((lo, mid))  # popped first: stretches come out in order
                    continue
            found.append((lo, hi))
        return found

    def _in_run(
        self, data: bytes, m: re.Match[bytes], splitter: re.Pattern[bytes]
    ) -> Iterator[tuple[int, int]]:
        """Occurrences in one run: from the earliest unit that starts one, the longest."""
        first = m.end("plus") if m.start("plus") >= 0 else m.start()
        units: list[tuple[int, int, bytes]] = []
        for u in splitter.finditer(data, first, m.end()):
            digits = u.group(1)
            if digits is not None:
                if not digits.isdigit():
                    digits = _normalise(digits)
                units.append((u.start(), u.end(), digits))
        forms, maxlen = self._forms, self._maxlen
        n = len(units)
        i = 0
        while i < n:
            acc = b""
            best = -1
            for j in range(i, n):
                acc += units[j][2]
                if len(acc) > maxlen:
                    break
                if acc in forms:
                    best = j
            if best < 0:
                i += 1
                continue
            # a plus stands before the run's first unit only
            yield (m.start() if i == 0 else units[i][0]), units[best][1]
            i = best + 1
