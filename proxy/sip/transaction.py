"""RFC 3261 §17 transaction state machines, sans-IO (aioquic style).

Four machines: client INVITE (§17.1.1), client non-INVITE (§17.1.2), server INVITE (§17.2.1)
and server non-INVITE (§17.2.2), with the RFC 6026 "Accepted" states and the RFC 4320 rules
for non-INVITE timeouts. No sockets, no clock: every input takes `now` (monotonic seconds) and
returns a list of events for the shell to act on; `next_deadline()` says when to call
`handle_timer(now)`. Payloads are opaque bytes from the TU and are resent byte for byte.

Each machine is two tables: `(state, input) -> (next state, action)` and, per state, the timers
that run in it. Entering a state keeps a timer that the previous state also ran (Timer E and F
carry on from Trying into Proceeding), arms the new ones and cancels the rest. A wait timer of
zero (D, I, J, K on a reliable transport) fires at once, inside the call that armed it.

An input that the current state does not allow raises `TransactionError`: that is a bug in the
caller. Network input the RFC tells us to absorb (retransmissions, late or stray responses) is
absorbed without error. `handle_timer` may be called at any time; it acts only on a due timer.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final

__all__ = [
    "DEFAULT_TIMER_SETTINGS",
    "MAGIC_COOKIE",
    "ClientInviteTransaction",
    "ClientNonInviteTransaction",
    "DeliverAck",
    "DeliverRequest",
    "DeliverResponse",
    "Event",
    "Input",
    "Send",
    "ServerInviteTransaction",
    "ServerNonInviteTransaction",
    "State",
    "Terminated",
    "TimedOut",
    "Timer",
    "TimerSettings",
    "TransactionError",
    "TransportFailed",
    "cancelled_invite_key",
    "client_transaction_key",
    "is_rfc3261_branch",
    "server_transaction_key",
]


class TransactionError(Exception):
    """An input the transaction's current state does not allow (a caller bug, not bad input)."""


@dataclass(frozen=True, slots=True)
class TimerSettings:
    """RFC 3261 §17.1.1.1 timer base values, in seconds.

    `timer_d` is separate because §17.1.1.2 fixes it at "at least 32 s" for unreliable
    transports rather than deriving it from T1.
    """

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    timer_d: float = 32.0

    def __post_init__(self) -> None:
        if not (self.t1 > 0 and self.t2 >= self.t1 and self.t4 > 0 and self.timer_d >= 0):
            raise ValueError(f"invalid SIP timer settings: {self}")


DEFAULT_TIMER_SETTINGS: Final = TimerSettings()


class State(enum.StrEnum):
    """Transaction states (§17 figures 5-8, RFC 6026 "Accepted"); INIT is before the first input."""

    INIT = "Init"
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"


class Timer(enum.StrEnum):
    """RFC 3261 §17 timers (table 4) plus RFC 6026 Timers L and M."""

    A = "A"  # client INVITE retransmit, doubles without cap
    B = "B"  # client INVITE timeout in Calling, 64*T1
    D = "D"  # client INVITE wait for response retransmissions in Completed
    E = "E"  # client non-INVITE retransmit, doubles up to T2
    F = "F"  # client non-INVITE timeout, 64*T1
    G = "G"  # server INVITE final-response retransmit, doubles up to T2
    H = "H"  # server INVITE wait for ACK, 64*T1
    I = "I"  # server INVITE absorb ACK retransmissions in Confirmed, T4  # noqa: E741
    J = "J"  # server non-INVITE absorb request retransmissions in Completed, 64*T1
    K = "K"  # client non-INVITE absorb response retransmissions in Completed, T4
    L = "L"  # server INVITE Accepted, 64*T1 (RFC 6026)
    M = "M"  # client INVITE Accepted, 64*T1 (RFC 6026)


class Input(enum.StrEnum):
    """Non-timer inputs; timer expiries use the `Timer` members as inputs."""

    START = "start"
    REQUEST = "request received"
    ACK = "ACK received"
    RESPONSE_1XX = "1xx received"
    RESPONSE_2XX = "2xx received"
    RESPONSE_3XX_6XX = "3xx-6xx received"
    SEND_1XX = "1xx from TU"
    SEND_2XX = "2xx from TU"
    SEND_3XX_6XX = "3xx-6xx from TU"
    TRANSPORT_ERROR = "transport error"
    ABANDON = "abandon"


# --- events (outputs) -------------------------------------------------------------------------
# Frozen so the machine can hand out the same instance again (a retransmission is the same Send).


class Send:
    """Pass these exact bytes to the transport. (Plain classes, not dataclasses, for the events
    made per message: compiled, a dataclass's generated __init__ stays interpreted.)"""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Send) and self.data == other.data

    def __hash__(self) -> int:
        return hash((Send, self.data))

    def __repr__(self) -> str:
        return f"Send(data={self.data!r})"


class DeliverResponse:
    """Pass this response up to the TU."""

    __slots__ = ("data", "status")

    def __init__(self, status: int, data: bytes) -> None:
        self.status = status
        self.data = data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DeliverResponse) and (self.status, self.data) == (
            other.status, other.data)

    def __hash__(self) -> int:
        return hash((DeliverResponse, self.status, self.data))

    def __repr__(self) -> str:
        return f"DeliverResponse(status={self.status!r}, data={self.data!r})"


@dataclass(frozen=True, slots=True)
class DeliverRequest:
    """The request that created this server transaction goes to the TU (first receipt only)."""


@dataclass(frozen=True, slots=True)
class DeliverAck:
    """An ACK for a 2xx matched this server INVITE transaction: pass it to the TU (RFC 6026)."""


@dataclass(frozen=True, slots=True)
class TimedOut:
    """Timer B, F (no final response) or H (no ACK) fired; RFC 4320: never turn F into a 408."""

    timer: Timer


@dataclass(frozen=True, slots=True)
class TransportFailed:
    """§17.1.4 / §17.2.4: the transport could not deliver what this transaction sent."""


@dataclass(frozen=True, slots=True)
class Terminated:
    """The transaction is over; the shell forgets it. Emitted exactly once."""


Event = (
    Send | DeliverResponse | DeliverRequest | DeliverAck | TimedOut | TransportFailed | Terminated
)

_DELIVER_REQUEST: Final = DeliverRequest()
_DELIVER_ACK: Final = DeliverAck()
_TRANSPORT_FAILED: Final = TransportFailed()
_TERMINATED: Final = Terminated()

# --- actions: what a transition emits ---------------------------------------------------------
# Signature (transaction, events, status, data); the table decides the state change.

_Action = Callable[[Any, list[Event], int, bytes], None]


def _nothing(tx: Any, events: list[Event], status: int, data: bytes) -> None:
    """No output: a silent transition, or network input the RFC says to absorb."""


_absorb = _nothing


def _send_request(tx: _ClientTransaction, events: list[Event], status: int, data: bytes) -> None:
    events.append(tx._request)


def _deliver_response(tx: Any, events: list[Event], status: int, data: bytes) -> None:
    events.append(DeliverResponse(status, data))


def _ack_and_deliver(
    tx: ClientInviteTransaction, events: list[Event], status: int, data: bytes
) -> None:
    # §17.1.1.3: the transaction itself acknowledges a non-2xx final response
    ack = Send(tx._ack_for(data))
    tx._ack = ack
    events.append(ack)
    events.append(DeliverResponse(status, data))


def _resend_ack(tx: ClientInviteTransaction, events: list[Event], status: int, data: bytes) -> None:
    if tx._ack is not None:
        events.append(tx._ack)


def _deliver_request(tx: Any, events: list[Event], status: int, data: bytes) -> None:
    events.append(_DELIVER_REQUEST)


def _deliver_ack(tx: Any, events: list[Event], status: int, data: bytes) -> None:
    events.append(_DELIVER_ACK)


def _send_response(tx: _ServerTransaction, events: list[Event], status: int, data: bytes) -> None:
    send = Send(data)
    tx._last_response = send
    events.append(send)


def _send_2xx(tx: _ServerTransaction, events: list[Event], status: int, data: bytes) -> None:
    # RFC 6026 §7.1: 2xx (and their retransmissions) come from the TU, never replayed by us
    events.append(Send(data))


def _resend_last_response(
    tx: _ServerTransaction, events: list[Event], status: int, data: bytes
) -> None:
    if tx._last_response is not None:
        events.append(tx._last_response)


def _report_transport_failure(tx: Any, events: list[Event], status: int, data: bytes) -> None:
    events.append(_TRANSPORT_FAILED)


def _report_timeout(timer: Timer) -> _Action:
    event = TimedOut(timer)

    def report(tx: Any, events: list[Event], status: int, data: bytes) -> None:
        events.append(event)

    return report


_Row = tuple[State, _Action]
_Transitions = dict[State, dict[str, _Row]]


class _Growth(enum.Enum):
    """How a retransmission interval changes each time its timer fires."""

    DOUBLE = "double"  # Timer A, §17.1.1.2
    DOUBLE_UP_TO_T2 = "double, capped at T2"  # Timer E in Trying, Timer G
    T2 = "T2"  # Timer E in Proceeding, §17.1.2.2


# state -> (retransmission timer, its growth, end timer); INIT and TERMINATED run no timers
_StateTimers = dict[State, tuple[Timer | None, _Growth | None, Timer | None]]

_S: Final = State
_I: Final = Input
_T: Final = Timer

# --- client INVITE: RFC 3261 §17.1.1 (figure 5) + RFC 6026 §8.4 ---------------------------------

_CLIENT_INVITE_TRANSITIONS: Final[_Transitions] = {
    _S.INIT: {
        _I.START: (_S.CALLING, _send_request),
    },
    _S.CALLING: {
        _T.A: (_S.CALLING, _send_request),
        _T.B: (_S.TERMINATED, _report_timeout(_T.B)),
        _I.RESPONSE_1XX: (_S.PROCEEDING, _deliver_response),
        _I.RESPONSE_2XX: (_S.ACCEPTED, _deliver_response),
        _I.RESPONSE_3XX_6XX: (_S.COMPLETED, _ack_and_deliver),
        _I.TRANSPORT_ERROR: (_S.TERMINATED, _report_transport_failure),
    },
    _S.PROCEEDING: {
        _I.RESPONSE_1XX: (_S.PROCEEDING, _deliver_response),
        _I.RESPONSE_2XX: (_S.ACCEPTED, _deliver_response),
        _I.RESPONSE_3XX_6XX: (_S.COMPLETED, _ack_and_deliver),
        # a response arrived, so the INVITE got through; the final may still come (§18.2.2)
        _I.TRANSPORT_ERROR: (_S.PROCEEDING, _absorb),
    },
    _S.COMPLETED: {
        _T.D: (_S.TERMINATED, _nothing),
        _I.RESPONSE_1XX: (_S.COMPLETED, _absorb),
        _I.RESPONSE_2XX: (_S.COMPLETED, _absorb),
        _I.RESPONSE_3XX_6XX: (_S.COMPLETED, _resend_ack),  # §17.1.1.2: replay the same ACK
        _I.TRANSPORT_ERROR: (_S.TERMINATED, _report_transport_failure),  # the ACK failed
    },
    _S.ACCEPTED: {
        _T.M: (_S.TERMINATED, _nothing),
        _I.RESPONSE_1XX: (_S.ACCEPTED, _absorb),
        _I.RESPONSE_2XX: (_S.ACCEPTED, _deliver_response),  # RFC 6026: every 2xx to the TU
        _I.RESPONSE_3XX_6XX: (_S.ACCEPTED, _absorb),
        _I.TRANSPORT_ERROR: (_S.ACCEPTED, _absorb),  # nothing of ours is in flight
    },
}

_CLIENT_INVITE_TIMERS: Final[_StateTimers] = {
    _S.CALLING: (_T.A, _Growth.DOUBLE, _T.B),
    _S.PROCEEDING: (None, None, None),  # Timer C belongs to the proxy core (§16.6 step 11)
    _S.COMPLETED: (None, None, _T.D),
    _S.ACCEPTED: (None, None, _T.M),
}

# --- client non-INVITE: RFC 3261 §17.1.2 (figure 6) + RFC 4320 --------------------------------

_CLIENT_NON_INVITE_TRANSITIONS: Final[_Transitions] = {
    _S.INIT: {
        _I.START: (_S.TRYING, _send_request),
    },
    _S.TRYING: {
        _T.E: (_S.TRYING, _send_request),
        _T.F: (_S.TERMINATED, _report_timeout(_T.F)),
        _I.RESPONSE_1XX: (_S.PROCEEDING, _deliver_response),
        _I.RESPONSE_2XX: (_S.COMPLETED, _deliver_response),
        _I.RESPONSE_3XX_6XX: (_S.COMPLETED, _deliver_response),
        _I.TRANSPORT_ERROR: (_S.TERMINATED, _report_transport_failure),
    },
    _S.PROCEEDING: {
        _T.E: (_S.PROCEEDING, _send_request),
        _T.F: (_S.TERMINATED, _report_timeout(_T.F)),
        _I.RESPONSE_1XX: (_S.PROCEEDING, _deliver_response),
        _I.RESPONSE_2XX: (_S.COMPLETED, _deliver_response),
        _I.RESPONSE_3XX_6XX: (_S.COMPLETED, _deliver_response),
        _I.TRANSPORT_ERROR: (_S.TERMINATED, _report_transport_failure),
    },
    _S.COMPLETED: {
        _T.K: (_S.TERMINATED, _nothing),
        _I.RESPONSE_1XX: (_S.COMPLETED, _absorb),
        _I.RESPONSE_2XX: (_S.COMPLETED, _absorb),
        _I.RESPONSE_3XX_6XX: (_S.COMPLETED, _absorb),
        _I.TRANSPORT_ERROR: (_S.COMPLETED, _absorb),  # the TU already has its final response
    },
}

_CLIENT_NON_INVITE_TIMERS: Final[_StateTimers] = {
    _S.TRYING: (_T.E, _Growth.DOUBLE_UP_TO_T2, _T.F),
    _S.PROCEEDING: (_T.E, _Growth.T2, _T.F),  # E and F keep running from Trying
    _S.COMPLETED: (None, None, _T.K),
}

# --- server INVITE: RFC 3261 §17.2.1 (figure 7) + RFC 6026 §7.1 --------------------------------

_SERVER_INVITE_TRANSITIONS: Final[_Transitions] = {
    _S.INIT: {
        _I.REQUEST: (_S.PROCEEDING, _deliver_request),
    },
    _S.PROCEEDING: {
        _I.REQUEST: (_S.PROCEEDING, _resend_last_response),  # replay the latest provisional
        _I.ACK: (_S.PROCEEDING, _absorb),  # no final sent yet: a stray ACK
        _I.SEND_1XX: (_S.PROCEEDING, _send_response),
        _I.SEND_2XX: (_S.ACCEPTED, _send_2xx),
        _I.SEND_3XX_6XX: (_S.COMPLETED, _send_response),
        _I.TRANSPORT_ERROR: (_S.TERMINATED, _report_transport_failure),
    },
    _S.COMPLETED: {
        _T.G: (_S.COMPLETED, _resend_last_response),
        _T.H: (_S.TERMINATED, _report_timeout(_T.H)),
        _I.REQUEST: (_S.COMPLETED, _resend_last_response),
        _I.ACK: (_S.CONFIRMED, _nothing),  # the ACK for a non-2xx ends here, not at the TU
        _I.TRANSPORT_ERROR: (_S.TERMINATED, _report_transport_failure),
    },
    _S.CONFIRMED: {
        _T.I: (_S.TERMINATED, _nothing),
        _I.REQUEST: (_S.CONFIRMED, _absorb),
        _I.ACK: (_S.CONFIRMED, _absorb),
        _I.TRANSPORT_ERROR: (_S.CONFIRMED, _absorb),  # nothing left to send
    },
    _S.ACCEPTED: {
        _T.L: (_S.TERMINATED, _nothing),
        _I.REQUEST: (_S.ACCEPTED, _absorb),
        _I.ACK: (_S.ACCEPTED, _deliver_ack),
        _I.SEND_2XX: (_S.ACCEPTED, _send_2xx),
        _I.TRANSPORT_ERROR: (_S.TERMINATED, _report_transport_failure),
    },
}

_SERVER_INVITE_TIMERS: Final[_StateTimers] = {
    _S.PROCEEDING: (None, None, None),
    _S.COMPLETED: (_T.G, _Growth.DOUBLE_UP_TO_T2, _T.H),
    _S.CONFIRMED: (None, None, _T.I),
    _S.ACCEPTED: (None, None, _T.L),
}

# --- server non-INVITE: RFC 3261 §17.2.2 (figure 8) + RFC 4320 --------------------------------
# No timer runs in Trying or Proceeding, so the transaction never answers 408 on its own
# (RFC 4320 §4.2); when the TU gives up it calls abandon() instead of responding.

_SERVER_NON_INVITE_TRANSITIONS: Final[_Transitions] = {
    _S.INIT: {
        _I.REQUEST: (_S.TRYING, _deliver_request),
    },
    _S.TRYING: {
        _I.REQUEST: (_S.TRYING, _absorb),
        _I.SEND_1XX: (_S.PROCEEDING, _send_response),
        _I.SEND_2XX: (_S.COMPLETED, _send_response),
        _I.SEND_3XX_6XX: (_S.COMPLETED, _send_response),
        _I.ABANDON: (_S.TERMINATED, _nothing),
        _I.TRANSPORT_ERROR: (_S.TERMINATED, _report_transport_failure),
    },
    _S.PROCEEDING: {
        _I.REQUEST: (_S.PROCEEDING, _resend_last_response),
        _I.SEND_1XX: (_S.PROCEEDING, _send_response),
        _I.SEND_2XX: (_S.COMPLETED, _send_response),
        _I.SEND_3XX_6XX: (_S.COMPLETED, _send_response),
        _I.ABANDON: (_S.TERMINATED, _nothing),
        _I.TRANSPORT_ERROR: (_S.TERMINATED, _report_transport_failure),
    },
    _S.COMPLETED: {
        _T.J: (_S.TERMINATED, _nothing),
        _I.REQUEST: (_S.COMPLETED, _resend_last_response),
        _I.TRANSPORT_ERROR: (_S.TERMINATED, _report_transport_failure),
    },
}

_SERVER_NON_INVITE_TIMERS: Final[_StateTimers] = {
    _S.TRYING: (None, None, None),
    _S.PROCEEDING: (None, None, None),
    _S.COMPLETED: (None, None, _T.J),
}

# wait timers that drop to zero on a reliable transport (§17.1.1.2, §17.1.2.2, §17.2.1, §17.2.2)
_ZERO_WHEN_RELIABLE: Final = frozenset({_T.D, _T.I, _T.J, _T.K})


def _end_timer_duration(timer: Timer, settings: TimerSettings, reliable: bool) -> float:
    if reliable and timer in _ZERO_WHEN_RELIABLE:
        return 0.0
    if timer is _T.D:
        return settings.timer_d
    if timer is _T.I or timer is _T.K:
        return settings.t4
    return 64 * settings.t1  # B, F, H, J, L, M


# --- the machines -----------------------------------------------------------------------------


class _Transaction:
    """Table-driven core shared by the four machines."""

    __slots__ = (
        "_end_at",
        "_end_timer",
        "_rtx_at",
        "_rtx_interval",
        "_rtx_timer",
        "reliable",
        "settings",
        "state",
    )

    _TRANSITIONS: ClassVar[_Transitions]
    _TIMERS: ClassVar[_StateTimers]

    def __init__(self, reliable: bool, settings: TimerSettings) -> None:
        self.state = State.INIT  # read-only for callers
        self.reliable = reliable
        self.settings = settings
        self._rtx_timer: Timer | None = None
        self._rtx_interval = 0.0
        self._rtx_at: float | None = None
        self._end_timer: Timer | None = None
        self._end_at: float | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state} reliable={self.reliable}>"

    def next_deadline(self) -> float | None:
        """When the shell must call `handle_timer`; None when no timer runs."""
        rtx_at = self._rtx_at
        end_at = self._end_at
        if rtx_at is None:
            return end_at
        if end_at is None or rtx_at < end_at:
            return rtx_at
        return end_at

    def handle_timer(self, now: float) -> list[Event]:
        """Fire the due timer, if any. Safe to call early, late or after termination.

        When the end timer is due it wins: a retransmission right before giving up is useless.
        """
        end_at = self._end_at
        if end_at is not None and now >= end_at:
            events: list[Event] = []
            self._step(self._end_timer, now, 0, b"", events)  # type: ignore[arg-type]
            return events
        rtx_at = self._rtx_at
        if rtx_at is not None and now >= rtx_at:
            events = []
            self._step(self._rtx_timer, now, 0, b"", events)  # type: ignore[arg-type]
            # retransmission timers always loop back to their own state
            growth = self._TIMERS[self.state][1]
            interval = self._rtx_interval
            if growth is _Growth.DOUBLE:
                interval *= 2
            elif growth is _Growth.DOUBLE_UP_TO_T2:
                interval = min(interval * 2, self.settings.t2)
            else:
                interval = self.settings.t2
            self._rtx_interval = interval
            self._rtx_at = now + interval
            return events
        return []

    def transport_error(self, now: float) -> list[Event]:
        """The transport failed to send something this transaction asked it to send."""
        events: list[Event] = []
        self._step(Input.TRANSPORT_ERROR, now, 0, b"", events)
        return events

    def _step(self, inp: str, now: float, status: int, data: bytes, events: list[Event]) -> None:
        try:
            next_state, action = self._TRANSITIONS[self.state][inp]
        except KeyError:
            raise TransactionError(
                f"{type(self).__name__}: {inp!s} is not allowed in state {self.state!s}"
            ) from None
        action(self, events, status, data)
        if next_state is not self.state:
            self._enter(next_state, now, events)

    def _enter(self, state: State, now: float, events: list[Event]) -> None:
        self.state = state
        if state is State.TERMINATED:
            self._rtx_timer = self._end_timer = None
            self._rtx_at = self._end_at = None
            events.append(_TERMINATED)
            return
        rtx, _growth, end = self._TIMERS[state]
        if rtx is None or self.reliable:  # §17: no retransmissions over reliable transports
            self._rtx_timer = None
            self._rtx_at = None
        elif rtx is not self._rtx_timer:
            t1 = self.settings.t1
            self._rtx_timer = rtx
            self._rtx_interval = t1
            self._rtx_at = now + t1
        if end is None:
            self._end_timer = None
            self._end_at = None
        elif end is not self._end_timer:
            self._end_timer = end
            duration = _end_timer_duration(end, self.settings, self.reliable)
            self._end_at = now + duration
            if duration <= 0:
                self._step(end, now, 0, b"", events)


def _response_input(status: int, one: Input, two: Input, final: Input) -> Input:
    if 200 <= status < 300:
        return two
    if 100 <= status < 200:
        return one
    if 300 <= status < 700:
        return final
    raise TransactionError(f"{status!r} is not a SIP status code (100-699)")


class _ClientTransaction(_Transaction):
    __slots__ = ("_request",)

    def __init__(self, request: bytes, reliable: bool, settings: TimerSettings) -> None:
        super().__init__(reliable, settings)
        self._request = Send(request)

    def start(self, now: float) -> list[Event]:
        """Send the request (§17.1.1.2 / §17.1.2.2) and arm the state's timers."""
        events: list[Event] = []
        self._step(Input.START, now, 0, b"", events)
        return events

    def receive_response(self, status: int, data: bytes, now: float) -> list[Event]:
        """A response matched this transaction (§17.1.3)."""
        events: list[Event] = []
        inp = _response_input(
            status, Input.RESPONSE_1XX, Input.RESPONSE_2XX, Input.RESPONSE_3XX_6XX
        )
        self._step(inp, now, status, data, events)
        return events


class ClientInviteTransaction(_ClientTransaction):
    """RFC 3261 §17.1.1 client INVITE transaction, with RFC 6026 "Accepted".

    `ack_for(response_bytes) -> ack_bytes` builds the ACK for a non-2xx final response
    (§17.1.1.3); it is called once and that ACK is replayed for every retransmitted final.
    """

    __slots__ = ("_ack", "_ack_for")

    _TRANSITIONS = _CLIENT_INVITE_TRANSITIONS
    _TIMERS = _CLIENT_INVITE_TIMERS

    def __init__(
        self,
        request: bytes,
        ack_for: Callable[[bytes], bytes],
        *,
        reliable: bool = False,
        settings: TimerSettings = DEFAULT_TIMER_SETTINGS,
    ) -> None:
        super().__init__(request, reliable, settings)
        self._ack_for = ack_for
        self._ack: Send | None = None


class ClientNonInviteTransaction(_ClientTransaction):
    """RFC 3261 §17.1.2 client non-INVITE transaction; Timer F reports `TimedOut` (RFC 4320)."""

    __slots__ = ()

    _TRANSITIONS = _CLIENT_NON_INVITE_TRANSITIONS
    _TIMERS = _CLIENT_NON_INVITE_TIMERS

    def __init__(
        self,
        request: bytes,
        *,
        reliable: bool = False,
        settings: TimerSettings = DEFAULT_TIMER_SETTINGS,
    ) -> None:
        super().__init__(request, reliable, settings)


class _ServerTransaction(_Transaction):
    __slots__ = ("_last_response",)

    def __init__(self, reliable: bool, settings: TimerSettings) -> None:
        super().__init__(reliable, settings)
        self._last_response: Send | None = None

    @property
    def has_responded(self) -> bool:
        """Whether the TU has sent any response (a provisional one included) through it."""
        return self._last_response is not None

    def receive_request(self, now: float) -> list[Event]:
        """The request (first receipt or a retransmission) matched this transaction (§17.2.3)."""
        events: list[Event] = []
        self._step(Input.REQUEST, now, 0, b"", events)
        return events

    def send_response(self, status: int, data: bytes, now: float) -> list[Event]:
        """The TU sends a response through this transaction."""
        events: list[Event] = []
        inp = _response_input(status, Input.SEND_1XX, Input.SEND_2XX, Input.SEND_3XX_6XX)
        self._step(inp, now, status, data, events)
        return events


class ServerInviteTransaction(_ServerTransaction):
    """RFC 3261 §17.2.1 server INVITE transaction, with RFC 6026 "Accepted".

    The machine cannot build messages, so the "100 Trying within 200 ms" of §17.2.1 is the
    TU's job: it passes the 100 to `send_response` like any other provisional response (and
    reads `has_responded` to know whether one is still owed).
    """

    __slots__ = ()

    _TRANSITIONS = _SERVER_INVITE_TRANSITIONS
    _TIMERS = _SERVER_INVITE_TIMERS

    def __init__(
        self, *, reliable: bool = False, settings: TimerSettings = DEFAULT_TIMER_SETTINGS
    ) -> None:
        super().__init__(reliable, settings)

    def receive_ack(self, now: float) -> list[Event]:
        """An ACK matched this transaction (ACK keys map to the INVITE's, §17.2.3)."""
        events: list[Event] = []
        self._step(Input.ACK, now, 0, b"", events)
        return events


class ServerNonInviteTransaction(_ServerTransaction):
    """RFC 3261 §17.2.2 server non-INVITE transaction; never answers on its own (RFC 4320)."""

    __slots__ = ()

    _TRANSITIONS = _SERVER_NON_INVITE_TRANSITIONS
    _TIMERS = _SERVER_NON_INVITE_TIMERS

    def __init__(
        self, *, reliable: bool = False, settings: TimerSettings = DEFAULT_TIMER_SETTINGS
    ) -> None:
        super().__init__(reliable, settings)

    def abandon(self, now: float) -> list[Event]:
        """End without a final response: RFC 4320 §4.2 forbids the 408 a timeout would suggest.

        The proxy calls this when its client transaction reports `TimedOut(F)`.
        """
        events: list[Event] = []
        self._step(Input.ABANDON, now, 0, b"", events)
        return events


# --- matching keys ----------------------------------------------------------------------------

MAGIC_COOKIE: Final = "z9hG4bK"


def is_rfc3261_branch(branch: str | None) -> bool:
    """True when the branch carries the magic cookie and something after it (RFC 4475 §3.2.1)."""
    return branch is not None and len(branch) > 7 and branch.startswith(MAGIC_COOKIE)


def server_transaction_key(
    method: str,
    branch: str | None,
    sent_by: str,
    request_uri: str,
    from_tag: str | None,
    to_tag: str | None,
    call_id: str,
    cseq_num: int,
    cseq_method: str,
    top_via_raw: str,
) -> tuple[object, ...]:
    """The key a request matches a server transaction by (RFC 3261 §17.2.3).

    With the magic cookie: (branch, sent-by, method), ACK mapped to INVITE so an ACK for a
    non-2xx finds its INVITE; CANCEL keeps its own method (its own transaction; see
    `cancelled_invite_key`). Without it, the RFC 2543 rules: Request-URI (pass it in a canonical
    form), To tag, From tag, Call-ID, CSeq number and method (ACK mapped to INVITE), raw top Via.
    The To tag is left out for INVITE/ACK: the ACK carries the To tag of the *response*, not of
    the INVITE, so it cannot be part of the INVITE's key; a caller that wants the §17.2.3 check
    of an ACK's To tag against the response sent makes it after the lookup.
    Only `method`, `branch` and `sent_by` are read when `is_rfc3261_branch(branch)`, so a lazy
    caller may pass placeholders for the rest.
    """
    if branch is not None and len(branch) > 7 and branch.startswith(MAGIC_COOKIE):
        if method == "ACK":
            method = "INVITE"
        return (branch, sent_by.lower(), method)  # host names compare case-insensitively
    if cseq_method == "ACK":
        cseq_method = "INVITE"
    if cseq_method == "INVITE":
        to_tag = None
    # 7 items: a 2543 key never equals a 3-item 3261 key
    return (request_uri, to_tag, from_tag, call_id, cseq_num, cseq_method, top_via_raw)


def cancelled_invite_key(cancel_key: tuple[object, ...]) -> tuple[object, ...]:
    """The server key of the INVITE that a CANCEL (given its own key) cancels (RFC 3261 §9.2).

    A CANCEL copies the INVITE's branch, sent-by, Request-URI, tags, Call-ID, CSeq number and
    top Via, so only the method differs.
    """
    if len(cancel_key) == 3:
        return (cancel_key[0], cancel_key[1], "INVITE")
    request_uri, _to_tag, from_tag, call_id, cseq_num, _method, top_via = cancel_key
    return (request_uri, None, from_tag, call_id, cseq_num, "INVITE", top_via)


def client_transaction_key(branch: str, cseq_method: str) -> tuple[str, str]:
    """The key a response matches a client transaction by (§17.1.3): top Via branch + CSeq method.

    The method separates a CANCEL from the INVITE whose branch it shares.
    """
    return (branch, cseq_method)
