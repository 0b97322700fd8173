"""Maximum call duration, sans-IO: which limit a call gets, what the proxy remembers of an
answered call that has one, and the BYE it sends to each side when the limit is reached.

Only answered calls with a limit have state here (`LimitedCall`); every other call costs
nothing. The BYE each side receives is built from that side's own view of the dialog
(RFC 3261 §12.2.1.1): its Call-ID, the remote party's identity as it knows it (From, with the
remote tag), its own identity (To, with its tag), its Contact as the Request-URI and the route
set from the Record-Route on its side of the proxy. A side never learns the other's real
number from it: the caller gets its own To row back as the From (X as it dialled it), the
callee the From the proxy gave the INVITE (X).

CSeq (RFC 3261 §12.2.1.1, §12.2.2): the BYE to the callee continues the caller's CSeq space,
the one to the caller the callee's. The proxy tracks the highest CSeq of the in-dialog requests
it forwards in each direction and adds `CSEQ_MARGIN`: a UAS accepts any CSeq greater than the
last one it saw, so the jump is legal, and it covers the requests a worker may not see (with
several workers, an in-dialog request over a TCP connection another worker holds is handled
there).
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

from proxy.privacy import CALLEE, CALLER

CSEQ_MARGIN: Final = 100  # added to the highest CSeq seen in a direction (see the module docstring)
CSEQ_MAX: Final = 2**31 - 1  # RFC 3261 §8.1.1.5: a CSeq sequence number is below 2**31
ENDED_MEMORY_S: Final = 120.0  # in-dialog requests of a call the proxy ended get 481 this long
RELEASE_REASON: Final = "max_call_duration"


def lowest_limit(*limits: float | None) -> float | None:
    """The strictest of the limits that are set (None when none is)."""
    found: float | None = None
    for limit in limits:
        if limit is not None and limit > 0 and (found is None or limit < found):
            found = limit
    return found


class Leg(NamedTuple):
    """How the proxy reaches one side with a request of its own in that side's dialog."""

    call_id: str  # the Call-ID this side knows
    remote: str  # From: the other party as this side knows it, with the other party's tag
    local: str  # To: this side's own identity, with its tag
    target: str  # Request-URI: this side's Contact (its remote target)
    routes: tuple[str, ...]  # Route: the route set between the proxy and this side
    peer: str  # how this side's leg is reached (a token's `peer`, proxy/legs.py)


class LegSource(NamedTuple):
    """One side's dialog as the 2xx left it, unparsed: made into a Leg only when the proxy
    ends the call, which most calls never reach (parsing Contacts and route sets for every
    answered call cost about 7 % of the core's time per call)."""

    call_id: str
    remote: str  # as Leg (the caller's: its own To row, the callee's tag added when made)
    local: str  # as Leg
    contacts: tuple[str, ...]  # this side's Contact header values (unsplit rows)
    default_target: str  # the Request-URI when it sent no Contact
    records: tuple[str, ...]  # the 2xx's or the INVITE's Record-Route values (unsplit rows)
    peer: str  # as Leg


class LimitedCall:
    """An answered call with a maximum duration, until it ends (and ENDED_MEMORY_S after)."""

    __slots__ = ("answered_at", "byes", "call_ids", "cseq", "deadline", "ended", "legs",
                 "limit_s", "sources", "x")

    def __init__(self, sources: dict[str, LegSource], caller_cseq: int, limit_s: float,
                 now: float, x: str) -> None:
        self.sources = sources  # by side (CALLER, CALLEE)
        self.call_ids = (sources[CALLER].call_id, sources[CALLEE].call_id)
        self.legs: dict[str, Leg] | None = None  # made from the sources when first needed
        # the highest CSeq of the requests each side has sent in the dialog
        self.cseq = {CALLER: caller_cseq, CALLEE: 0}
        self.limit_s = limit_s
        self.answered_at = now
        self.deadline = now + limit_s  # the limit; once ended: when the state goes
        self.ended = False
        # our BYEs in progress: branch → (client transaction, next hop)
        self.byes: dict[str, tuple[Any, Any]] = {}
        self.x = x

    def bye_cseq(self, receiver: str) -> int:
        """The CSeq of the proxy's BYE to `receiver`: past every request the other side sent."""
        sender = CALLEE if receiver == CALLER else CALLER
        return min(self.cseq[sender] + CSEQ_MARGIN, CSEQ_MAX)

    def next_deadline(self) -> float:
        deadline = self.deadline
        for tx, _hop in self.byes.values():
            d = tx.next_deadline()
            if d is not None and d < deadline:
                deadline = d
        return deadline


def build_bye(leg: Leg, cseq: int, via: str, *, reason: str = RELEASE_REASON) -> bytes:
    """The BYE the proxy sends to one side (its own Via on top, Max-Forwards 70)."""
    rows = [f"BYE {leg.target} SIP/2.0", f"Via: {via}", "Max-Forwards: 70"]
    rows.extend(f"Route: {route}" for route in leg.routes)
    rows += [f"From: {leg.remote}", f"To: {leg.local}", f"Call-ID: {leg.call_id}",
             f"CSeq: {cseq} BYE", f'Reason: Q.850;cause=16;text="{reason}"',
             "Content-Length: 0"]
    return ("\r\n".join(rows) + "\r\n\r\n").encode("latin-1")


def with_tag(row: str, tag: str) -> str:
    """A From/To value with `;tag=` added (the caller's To row gets the callee's tag)."""
    return f"{row.rstrip()};tag={tag}"
