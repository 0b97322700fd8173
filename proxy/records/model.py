"""One record per call attempt: its fields, how a refusal and a release are named, and the
Q.850 cause (RFC 3398 §8.2.6.1 when no Reason header gives one).

Times are unix seconds (float) while the call runs and ISO 8601 UTC with milliseconds in the
record. A record is a flat dict of strings: one Redis Stream field per record field, absent
values omitted; the HTTP push turns `ring_ms`, `talk_s`, `sip_status` and `q850_cause` back into
numbers.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime

# Every field, in the order the README documents them.
FIELDS = (
    "record_id", "call_id", "binding_id", "tenant", "out_id", "order_id", "user_data", "x",
    "caller", "callee", "display_number", "direction", "invite_at", "forwarded_at", "ring_at",
    "answer_at", "release_at", "ring_ms", "talk_s", "release_dir", "sip_status", "q850_cause",
    "refusal", "gateway", "instance",
)
INT_FIELDS = frozenset(("ring_ms", "talk_s", "sip_status", "q850_cause"))
TIME_FIELDS = ("invite_at", "forwarded_at", "ring_at", "answer_at", "release_at")

# direction
A_TO_B, B_TO_A, N_TO_A, REFUSED = "a_to_b", "b_to_a", "n_to_a", "refused"
# release_dir
BY_CALLER, BY_CALLEE, BY_PROXY = "caller", "callee", "proxy"

# The core's outcome of a call it answered itself → the record's `refusal`.
REFUSAL_BY_OUTCOME = {
    "no binding": "no_binding",
    "not a party": "not_party",
    "no caller number": "not_party",
    "direction restricted": "direction_restricted",
    "store unavailable": "store_unavailable",
    "cancelled": "cancelled",
    "timer c": "no_answer",
    "no gateway": "gateway_failure",
    "downstream timeout": "gateway_failure",
    "route refused": "route_refused",
    "unreadable body": "unreadable_body",
    "internal error": "internal_error",
}


def refusal_for_status(status: int, cancelled: bool) -> str:
    """`refusal` of a call the callee side ended with a final response >= 300."""
    if status == 487 or cancelled:
        return "cancelled"
    if status in (486, 600):
        return "busy"
    if status in (408, 480):
        return "no_answer"
    if status == 603:
        return "declined"
    if status >= 500:
        return "gateway_failure"
    return "callee_rejected"


# RFC 3398 §8.2.6.1 (SIP status → ISUP cause), 487 → 31 as most gateways map it.
_Q850_BY_STATUS = {
    400: 41, 401: 21, 402: 21, 403: 21, 404: 1, 405: 63, 406: 79, 407: 21, 408: 102, 410: 22,
    413: 127, 414: 127, 415: 79, 416: 127, 420: 127, 421: 127, 423: 127, 480: 18, 481: 41,
    482: 25, 483: 25, 484: 28, 485: 1, 486: 17, 487: 31, 488: 127, 500: 41, 501: 79, 502: 38,
    503: 41, 504: 102, 505: 127, 513: 127, 600: 17, 603: 21, 604: 1, 606: 58,
}
NORMAL_CLEARING = 16
_Q850 = re.compile(r"(?i)\bQ\.850\b[^,]*?;\s*cause\s*=\s*(\d{1,3})")


def q850_for_status(status: int) -> int:
    if 200 <= status < 300:
        return NORMAL_CLEARING
    return _Q850_BY_STATUS.get(status, 31 if status < 500 else 41)


def q850_from_reason(values: list[str]) -> int | None:
    """The cause of a `Reason: Q.850;cause=N` header (RFC 3326), if one is there."""
    for value in values:
        m = _Q850.search(value)
        if m is not None:
            return int(m.group(1))
    return None


def record_id_for(call_id: str, from_tag: str | None, cseq: int) -> str:
    """A call attempt's id: the same INVITE always gives the same id (retransmissions, a
    replayed spool), a new attempt another one. 32 hex digits; reveals nothing of the call."""
    text = f"{call_id}\x00{from_tag or ''}\x00{cseq}"
    return hashlib.blake2b(text.encode("latin-1", "replace"), digest_size=16,
                           person=b"sip700 record").hexdigest()


def call_key(caller_call_id: str) -> str:
    """Where a live call's state is filed (memory, Redis): a digest of the caller's Call-ID."""
    return hashlib.blake2b(caller_call_id.encode("latin-1", "replace"), digest_size=12,
                           person=b"sip700 call").hexdigest()


def iso(t: float) -> str:
    """ISO 8601 UTC with milliseconds: 2026-01-02T03:04:05.678Z."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def for_json(record: dict[str, str]) -> dict[str, object]:
    """A stored record (all strings) as the HTTP push and the commands show it."""
    return {k: (int(v) if k in INT_FIELDS and v.lstrip("-").isdigit() else v)
            for k, v in record.items()}
