"""Call tracking inside the core, sans-IO: the core reports what happens to a call (INVITE
received, forwarded, first 18x, answer, release, refusal); the tracker turns that into one record
per call attempt and, for tenants that asked, call-status events. What it produces waits in
`out` for the shell, which writes it in batches (proxy/records/writer.py).

Where a call's state lives:
- until the INVITE is answered: on the core's Relay (`CallAttempt`), in this worker's memory;
- once answered: in this worker's memory (`live`, by a digest of the caller's Call-ID) and, in
  the same write batch, in a Redis hash (`open` op) that outlives the process. The BYE, routed
  by its sealed token to any worker or to a restarted process, completes the record from memory
  when the call is there, else with a `release` op the shell resolves from the Redis hash
  (read and deleted atomically: one record however many BYEs arrive).

Ops in `out` (tuples; the shell's writer and its spool know them):
    ("record", fields)          a finished record
    ("event", fields)           a call-status event (start, ring, answer, end)
    ("open", key, fields)       an answered call's record so far (a Redis hash until its end)
    ("close", key)              the call ended here: its hash goes
    ("release", key, release)   a BYE for an answered call this process does not hold
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

from proxy.records.model import (
    A_TO_B,
    BY_CALLEE,
    BY_CALLER,
    BY_PROXY,
    REFUSAL_BY_OUTCOME,
    REFUSED,
    call_key,
    iso,
    q850_for_status,
    q850_from_reason,
    record_id_for,
    refusal_for_status,
)

ENDED_MEMORY_S = 32.0  # a BYE retransmission (Timer F) after the record was made: ignored


class CallAttempt:
    """One INVITE's call, from its arrival to its final response (then, if answered, `live`)."""

    __slots__ = ("answer_at", "binding_id", "call_id", "callee", "caller", "cancelled",
                 "direction", "early_release", "events", "forwarded_at", "gateway", "invite_at",
                 "key", "order_id", "out_id", "record_id", "ring_at", "tenant", "user_data", "x")

    def __init__(self, record_id: str, call_id: str, x: str, caller: str, invite_at: float
                 ) -> None:
        self.record_id = record_id
        self.call_id = call_id
        self.x = x
        self.caller = caller
        self.invite_at = invite_at
        self.callee = ""
        self.direction = ""
        self.binding_id = self.tenant = self.out_id = self.order_id = self.user_data = None
        self.forwarded_at = self.ring_at = self.answer_at = 0.0
        self.gateway = ""
        self.cancelled = False
        self.early_release = ""  # a BYE before the answer: who sent it
        self.events = False
        self.key = ""


class CallTracker:
    """Records and events for one worker's calls. Not thread-safe; the core calls it."""

    def __init__(self, instance: str, *, event_tenants: frozenset[str] = frozenset(),
                 wall_offset: float | None = None) -> None:
        self.instance = instance
        self.event_tenants = event_tenants
        # the core's clock is monotonic; records carry wall-clock times
        self.offset = (time.time() - time.monotonic()) if wall_offset is None else wall_offset
        self.out: list[tuple[Any, ...]] = []
        self.live: dict[str, dict[str, str]] = {}  # answered calls: key → record so far
        self.ringing: dict[str, CallAttempt] = {}  # forwarded, not yet answered: key → call
        self._ended: dict[str, float] = {}  # key → until when a BYE for it is a repeat
        # (until, key) as put in _ended, oldest first: `expire` reads this front, not the
        # dict's, where every deleted entry is a hole each `next(iter(...))` walks past
        self._ended_order: deque[tuple[float, str]] = deque()
        self.stats: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.stats[name] = self.stats.get(name, 0) + 1

    # ---- INVITE received ----------------------------------------------------------------------
    def invite(self, msg: Any, x: str, caller: str, now: float) -> CallAttempt:
        return CallAttempt(record_id_for(msg.call_id, msg.from_.tag, msg.cseq[0]), msg.call_id,
                           x, caller, now + self.offset)

    def refused_early(self, msg: Any, x: str, caller: str, refusal: str, status: int,
                      now: float) -> None:
        """An INVITE refused before it had a transaction (untrusted peer, not a middle
        number, overload)."""
        try:
            call = self.invite(msg, x, caller, now)
        except Exception:  # an unparsable From or CSeq: no record to make of it
            return
        self._finish_unconnected(call, status, refusal, BY_PROXY, now, None)

    # ---- lookup, forwarding, provisional responses ----------------------------------------------
    def resolved(self, call: CallAttempt, resolution: Any) -> None:
        call.binding_id = resolution.binding_id
        call.tenant = resolution.tenant
        call.out_id = resolution.out_id
        call.order_id = resolution.order_id
        call.user_data = resolution.user_data
        call.direction = resolution.leg
        call.events = resolution.tenant is not None and resolution.tenant in self.event_tenants

    def forwarded(self, call: CallAttempt, callee: str, gateway: str, now: float) -> None:
        """A branch of the INVITE went to `gateway` (failover: the last one tried counts)."""
        call.gateway = gateway
        if call.forwarded_at:
            return
        call.forwarded_at = now + self.offset
        call.callee = callee
        call.key = call_key(call.call_id)
        self.ringing[call.key] = call
        if call.events:
            self._event(call, "start", call.forwarded_at)

    def provisional(self, call: CallAttempt, status: int, now: float) -> None:
        if 180 <= status < 190 and not call.ring_at:
            call.ring_at = now + self.offset
            if call.events:
                self._event(call, "ring", call.ring_at)

    # ---- answer and release -------------------------------------------------------------------
    def answered(self, call: CallAttempt, now: float) -> None:
        call.answer_at = now + self.offset
        self.ringing.pop(call.key, None)
        fields = self._fields(call, 200)
        self.live[call.key] = fields
        self.out.append(("open", call.key, fields))
        if call.events:
            self._event(call, "answer", call.answer_at)
        if call.early_release:  # a BYE crossed the 200: the call ends at once
            self.bye(call.key, call.early_release, None, now)

    def bye(self, key: str, released_by: str, msg: Any, now: float) -> None:
        """A BYE from `released_by` (caller / callee) for the call filed under `key`."""
        fields = self.live.pop(key, None)
        if fields is None:
            call = self.ringing.get(key)
            if call is not None:  # BYE in an early dialog: the INVITE's final response ends it
                call.early_release = released_by
                return
            if key in self._ended:
                self._count("records_bye_repeated")
                return
        until = now + ENDED_MEMORY_S
        self._ended[key] = until
        self._ended_order.append((until, key))
        cause = _reason_cause(msg)
        release = {"release_at": now + self.offset, "release_dir": released_by,
                   "q850_cause": cause}
        if fields is None:  # answered by another process (or before a restart): in Redis
            self._count("records_released_from_redis")
            self.out.append(("release", key, release))
            return
        self.out.append(("close", key))
        self._emit_record(finish(fields, release))

    def final(self, call: CallAttempt, status: int, msg: Any, now: float) -> None:
        """The callee side's final response >= 300 ended the attempt."""
        released = call.early_release
        dir_ = (released or BY_CALLER) if (released or call.cancelled) else BY_CALLEE
        self._finish_unconnected(call, status, refusal_for_status(status, call.cancelled or
                                                                  bool(released)),
                                 dir_, now, _reason_cause(msg))

    def refused(self, call: CallAttempt, outcome: str, status: int, now: float) -> None:
        """The proxy answered the INVITE itself (a refusal, Timer C, a CANCEL, a failure)."""
        refusal = REFUSAL_BY_OUTCOME.get(outcome, outcome.replace(" ", "_"))
        released = BY_CALLER if refusal == "cancelled" else BY_PROXY
        self._finish_unconnected(call, status, refusal, released, now, None)

    def _finish_unconnected(self, call: CallAttempt, status: int, refusal: str,
                            released_by: str, now: float, cause: int | None) -> None:
        if call.key:
            self.ringing.pop(call.key, None)
        fields = self._fields(call, status)
        if not call.forwarded_at:
            fields["direction"] = REFUSED
        fields["refusal"] = refusal
        self._emit_record(finish(fields, {"release_at": now + self.offset,
                                          "release_dir": released_by,
                                          "q850_cause": cause}))

    def _emit_record(self, record: dict[str, str]) -> None:
        self.out.append(("record", record))
        self._count("records_made")
        event = self.end_event(record)
        if event is not None:
            self.out.append(event)

    def end_event(self, record: dict[str, str]) -> tuple[str, dict[str, str]] | None:
        """The `end` event of a finished record, for a tenant that asked for events (also for
        a record the shell completes from a call's Redis hash)."""
        if record.get("tenant") in self.event_tenants and record.get("forwarded_at"):
            return ("event", {**_event_base(record), "event": "end",
                              "at": record["release_at"]})
        return None

    def _fields(self, call: CallAttempt, status: int) -> dict[str, str]:
        f = {"record_id": call.record_id, "call_id": call.call_id, "x": call.x,
             "caller": call.caller, "invite_at": iso(call.invite_at),
             "sip_status": str(status), "instance": self.instance}
        if call.callee:
            f["callee"] = call.callee
            f["display_number"] = call.x  # the callee is shown X (From / P-Asserted-Identity)
        f["direction"] = call.direction or (A_TO_B if call.forwarded_at else REFUSED)
        for name in ("binding_id", "tenant", "out_id", "order_id", "user_data"):
            value = getattr(call, name)
            if value is not None:
                f[name] = str(value)
        if call.forwarded_at:
            f["forwarded_at"] = iso(call.forwarded_at)
        if call.ring_at:
            f["ring_at"] = iso(call.ring_at)
        if call.answer_at:
            f["answer_at"] = iso(call.answer_at)
        if call.gateway:
            f["gateway"] = call.gateway
        return f

    def _event(self, call: CallAttempt, event: str, at: float) -> None:
        fields = self._fields(call, 0)
        self.out.append(("event", {**_event_base(fields), "event": event, "at": iso(at)}))

    def expire(self, now: float) -> None:
        ended = self._ended
        order = self._ended_order
        while order and order[0][0] <= now:
            _until, key = order.popleft()
            if ended.get(key, math.inf) <= now:  # not put again since
                del ended[key]


_EVENT_FIELDS = ("record_id", "call_id", "binding_id", "tenant", "out_id", "order_id", "x",
                 "caller", "callee", "direction", "instance")


def _event_base(fields: dict[str, str]) -> dict[str, str]:
    return {k: fields[k] for k in _EVENT_FIELDS if k in fields}


def _reason_cause(msg: Any) -> int | None:
    if msg is None:
        return None
    try:
        values = msg.header_values("reason")
    except Exception:
        return None
    return q850_from_reason(values) if values else None


def finish(fields: dict[str, str], release: dict[str, Any]) -> dict[str, str]:
    """The record once the call is over: `fields` (what was known at the answer or the final
    response) with the release time, who released, the durations and the Q.850 cause."""
    from proxy.records.model import parse_iso

    out = dict(fields)
    release_at = float(release["release_at"])
    out["release_at"] = iso(release_at)
    out["release_dir"] = release["release_dir"]
    status = int(out.get("sip_status") or 0)
    cause = release.get("q850_cause")
    out["q850_cause"] = str(cause if cause is not None else q850_for_status(status))
    answer = out.get("answer_at")
    ring = out.get("ring_at")
    if ring:
        end = parse_iso(answer) if answer else release_at
        out["ring_ms"] = str(max(0, round((end - parse_iso(ring)) * 1000)))
    if answer:  # from the times as the record shows them (ms): a 3 s call says 3, not 4
        shown = parse_iso(out["release_at"]) - parse_iso(answer)
        out["talk_s"] = str(max(0, math.ceil(shown - 1e-6)))
    return out


__all__ = ["BY_CALLEE", "BY_CALLER", "BY_PROXY", "CallAttempt", "CallTracker", "finish"]
