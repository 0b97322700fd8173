"""RFC 3261 §17 transaction machines: flows, timer schedules, RFC 6026/4320 rules, keys."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sip.transaction import (
    DEFAULT_TIMER_SETTINGS,
    ClientInviteTransaction,
    ClientNonInviteTransaction,
    DeliverAck,
    DeliverRequest,
    DeliverResponse,
    Event,
    Send,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
    State,
    Terminated,
    TimedOut,
    Timer,
    TimerSettings,
    TransactionError,
    TransportFailed,
    cancelled_invite_key,
    client_transaction_key,
    is_rfc3261_branch,
    server_transaction_key,
)

INVITE = b"INVITE sip:700123456789012@example.com SIP/2.0\r\n...\r\n\r\n"
OPTIONS = b"OPTIONS sip:example.com SIP/2.0\r\n...\r\n\r\n"
R100 = b"SIP/2.0 100 Trying\r\n\r\n"
R180 = b"SIP/2.0 180 Ringing\r\n\r\n"
R183 = b"SIP/2.0 183 Session Progress\r\n\r\n"
R200 = b"SIP/2.0 200 OK\r\n\r\n"
R200_OTHER_FORK = b"SIP/2.0 200 OK\r\nTo: <sip:b@example.com>;tag=fork2\r\n\r\n"
R486 = b"SIP/2.0 486 Busy Here\r\n\r\n"
R503 = b"SIP/2.0 503 Service Unavailable\r\n\r\n"

T1 = DEFAULT_TIMER_SETTINGS.t1
T4 = DEFAULT_TIMER_SETTINGS.t4
SIXTY_FOUR_T1 = 64 * T1


class AckBuilder:
    """Stands in for the message layer: records what it was asked to acknowledge."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, response: bytes) -> bytes:
        self.calls.append(response)
        return b"ACK for " + response


def client_invite(**kwargs: object) -> tuple[ClientInviteTransaction, AckBuilder]:
    builder = AckBuilder()
    return ClientInviteTransaction(INVITE, builder, **kwargs), builder  # type: ignore[arg-type]


def run_timers(tx: object, until: float) -> list[tuple[float, list[Event]]]:
    """Call handle_timer at each deadline up to `until`, like an exact shell would."""
    fired = []
    deadline = tx.next_deadline()  # type: ignore[attr-defined]
    while deadline is not None and deadline <= until:
        fired.append((deadline, tx.handle_timer(deadline)))  # type: ignore[attr-defined]
        deadline = tx.next_deadline()  # type: ignore[attr-defined]
    return fired


# --- client INVITE (§17.1.1) -------------------------------------------------------------------


def test_client_invite_start_sends_request_and_arms_a() -> None:
    tx, _ = client_invite()
    assert tx.state is State.INIT
    assert tx.next_deadline() is None
    assert tx.start(10.0) == [Send(INVITE)]
    assert tx.state is State.CALLING
    assert tx.next_deadline() == 10.0 + T1


def test_client_invite_timer_a_doubles_without_cap_until_timer_b() -> None:
    tx, _ = client_invite()
    tx.start(0.0)
    fired = run_timers(tx, 100.0)
    assert fired[:-1] == [
        (t, [Send(INVITE)]) for t in (0.5, 1.5, 3.5, 7.5, 15.5, 31.5)
    ]  # intervals 0.5, 1, 2, 4, 8, 16: past T2, Timer A keeps doubling
    assert fired[-1] == (32.0, [TimedOut(Timer.B), Terminated()])
    assert tx.state is State.TERMINATED
    assert tx.next_deadline() is None


def test_client_invite_timer_a_ignores_t2_and_b_follows_t1() -> None:
    tx, _ = client_invite(settings=TimerSettings(t1=1.0, t2=2.0))
    tx.start(0.0)
    fired = run_timers(tx, 1000.0)
    assert [t for t, _ in fired] == [1.0, 3.0, 7.0, 15.0, 31.0, 63.0, 64.0]
    assert fired[-1][1] == [TimedOut(Timer.B), Terminated()]


def test_client_invite_late_timer_call_times_out_without_a_last_retransmission() -> None:
    tx, _ = client_invite()
    tx.start(0.0)
    # both A (0.5) and B (32) are overdue: giving up wins over one more retransmission
    assert tx.handle_timer(40.0) == [TimedOut(Timer.B), Terminated()]


def test_client_invite_early_timer_call_does_nothing() -> None:
    tx, _ = client_invite()
    tx.start(0.0)
    assert tx.handle_timer(0.49) == []
    assert tx.next_deadline() == 0.5
    assert tx.state is State.CALLING


def test_client_invite_provisional_stops_retransmissions_and_timer_b() -> None:
    tx, _ = client_invite()
    tx.start(0.0)
    assert tx.receive_response(100, R100, 0.2) == [DeliverResponse(100, R100)]
    assert tx.state is State.PROCEEDING
    assert tx.next_deadline() is None
    assert tx.handle_timer(1000.0) == []  # Timer C is the proxy core's, not ours
    assert tx.receive_response(180, R180, 3.0) == [DeliverResponse(180, R180)]
    assert tx.receive_response(183, R183, 4.0) == [DeliverResponse(183, R183)]
    assert tx.state is State.PROCEEDING


@pytest.mark.parametrize("via_proceeding", [False, True])
def test_client_invite_non_2xx_final_sends_ack_and_delivers(via_proceeding: bool) -> None:
    tx, builder = client_invite()
    tx.start(0.0)
    if via_proceeding:
        tx.receive_response(180, R180, 0.1)
    events = tx.receive_response(486, R486, 2.0)
    assert events == [Send(b"ACK for " + R486), DeliverResponse(486, R486)]
    assert builder.calls == [R486]
    assert tx.state is State.COMPLETED
    assert tx.next_deadline() == 2.0 + 32.0  # Timer D, no retransmission of the INVITE left


def test_client_invite_completed_replays_the_same_ack_for_each_retransmitted_final() -> None:
    tx, builder = client_invite()
    tx.start(0.0)
    tx.receive_response(486, R486, 1.0)
    for now in (1.5, 2.5, 4.5):
        assert tx.receive_response(486, R486, now) == [Send(b"ACK for " + R486)]
    assert builder.calls == [R486]  # built once, replayed byte for byte
    assert tx.next_deadline() == 33.0  # retransmissions do not restart Timer D


def test_client_invite_completed_absorbs_stray_provisional_and_2xx() -> None:
    tx, _ = client_invite()
    tx.start(0.0)
    tx.receive_response(503, R503, 1.0)
    assert tx.receive_response(180, R180, 2.0) == []
    assert tx.receive_response(200, R200, 3.0) == []
    assert tx.state is State.COMPLETED


def test_client_invite_timer_d_terminates() -> None:
    tx, _ = client_invite()
    tx.start(0.0)
    tx.receive_response(486, R486, 1.0)
    assert tx.handle_timer(32.9) == []
    assert tx.handle_timer(33.0) == [Terminated()]
    assert tx.next_deadline() is None


def test_client_invite_timer_d_is_configurable() -> None:
    tx, _ = client_invite(settings=TimerSettings(timer_d=40.0))
    tx.start(0.0)
    tx.receive_response(486, R486, 1.0)
    assert tx.next_deadline() == 41.0


@pytest.mark.parametrize("via_proceeding", [False, True])
def test_client_invite_2xx_enters_accepted_and_delivers_every_2xx(via_proceeding: bool) -> None:
    tx, builder = client_invite()
    tx.start(0.0)
    if via_proceeding:
        tx.receive_response(180, R180, 0.1)
    assert tx.receive_response(200, R200, 1.0) == [DeliverResponse(200, R200)]
    assert tx.state is State.ACCEPTED
    assert tx.next_deadline() == 1.0 + SIXTY_FOUR_T1  # Timer M; Timer A is gone
    # RFC 6026 §8.4: retransmissions and 2xx from other forks all go up (the proxy forwards them)
    assert tx.receive_response(200, R200, 1.5) == [DeliverResponse(200, R200)]
    assert tx.receive_response(200, R200_OTHER_FORK, 2.0) == [DeliverResponse(200, R200_OTHER_FORK)]
    assert tx.receive_response(180, R180, 2.5) == []
    assert tx.receive_response(486, R486, 3.0) == []
    assert builder.calls == []  # the ACK for a 2xx is the TU's business
    assert tx.handle_timer(1.0 + SIXTY_FOUR_T1) == [Terminated()]


def test_client_invite_reliable_has_no_timer_a_and_zero_timer_d() -> None:
    tx, _ = client_invite(reliable=True)
    assert tx.start(0.0) == [Send(INVITE)]
    assert tx.next_deadline() == SIXTY_FOUR_T1  # only Timer B
    assert tx.handle_timer(10.0) == []
    assert tx.receive_response(486, R486, 11.0) == [
        Send(b"ACK for " + R486),
        DeliverResponse(486, R486),
        Terminated(),
    ]
    assert tx.state is State.TERMINATED


def test_client_invite_reliable_times_out_at_64_t1() -> None:
    tx, _ = client_invite(reliable=True)
    tx.start(5.0)
    assert run_timers(tx, 1000.0) == [(5.0 + SIXTY_FOUR_T1, [TimedOut(Timer.B), Terminated()])]


def test_client_invite_reliable_accepted_still_waits_timer_m() -> None:
    tx, _ = client_invite(reliable=True)
    tx.start(0.0)
    tx.receive_response(200, R200, 1.0)
    assert tx.state is State.ACCEPTED
    assert tx.next_deadline() == 1.0 + SIXTY_FOUR_T1


@pytest.mark.parametrize("setup", ["calling", "completed"])
def test_client_invite_transport_error_terminates(setup: str) -> None:
    tx, _ = client_invite()
    tx.start(0.0)
    if setup == "completed":
        tx.receive_response(486, R486, 1.0)  # the ACK is what failed
    assert tx.transport_error(1.1) == [TransportFailed(), Terminated()]
    assert tx.state is State.TERMINATED
    assert tx.next_deadline() is None


@pytest.mark.parametrize(("status", "state"), [(180, State.PROCEEDING), (200, State.ACCEPTED)])
def test_client_invite_transport_error_absorbed_when_nothing_is_in_flight(
    status: int, state: State
) -> None:
    tx, _ = client_invite()
    tx.start(0.0)
    tx.receive_response(status, R200, 1.0)
    assert tx.transport_error(1.1) == []
    assert tx.state is state


def test_client_invite_rejected_inputs() -> None:
    tx, _ = client_invite()
    with pytest.raises(TransactionError):
        tx.receive_response(180, R180, 0.0)  # not started
    with pytest.raises(TransactionError):
        tx.transport_error(0.0)
    tx.start(0.0)
    with pytest.raises(TransactionError):
        tx.start(0.1)
    for bad_status in (0, 99, 700, 999):
        with pytest.raises(TransactionError):
            tx.receive_response(bad_status, R200, 0.2)
    assert tx.state is State.CALLING  # a rejected input changes nothing
    tx.transport_error(0.3)
    with pytest.raises(TransactionError):
        tx.receive_response(200, R200, 0.4)  # the shell must have forgotten us
    with pytest.raises(TransactionError):
        tx.transport_error(0.5)
    assert tx.handle_timer(100.0) == []  # stale timer calls are harmless


# --- client non-INVITE (§17.1.2) ---------------------------------------------------------------


def test_client_non_invite_timer_e_doubles_up_to_t2_then_f_times_out() -> None:
    tx = ClientNonInviteTransaction(OPTIONS)
    assert tx.start(0.0) == [Send(OPTIONS)]
    assert tx.state is State.TRYING
    fired = run_timers(tx, 100.0)
    expected = (0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5)
    assert fired[:-1] == [(t, [Send(OPTIONS)]) for t in expected]
    # RFC 4320: the timeout goes to the TU as such, never as a made-up 408
    assert fired[-1] == (32.0, [TimedOut(Timer.F), Terminated()])


def test_client_non_invite_custom_t2_caps_timer_e() -> None:
    tx = ClientNonInviteTransaction(OPTIONS, settings=TimerSettings(t1=0.25, t2=1.0))
    tx.start(0.0)
    fired = run_timers(tx, 100.0)
    times = [t for t, _ in fired]
    assert times[:5] == [0.25, 0.75, 1.75, 2.75, 3.75]
    assert times[-1] == 16.0
    assert fired[-1][1] == [TimedOut(Timer.F), Terminated()]


def test_client_non_invite_provisional_keeps_e_running_and_resets_it_to_t2() -> None:
    tx = ClientNonInviteTransaction(OPTIONS)
    tx.start(0.0)
    assert tx.handle_timer(0.5) == [Send(OPTIONS)]  # next at 1.5
    assert tx.receive_response(100, R100, 1.2) == [DeliverResponse(100, R100)]
    assert tx.state is State.PROCEEDING
    assert tx.next_deadline() == 1.5  # Timer E carries on from Trying
    fired = run_timers(tx, 100.0)
    # §17.1.2.2: in Proceeding, E resets to T2 each time (1.5 -> 5.5, not 1.5 -> 3.5)
    assert [t for t, _ in fired[:4]] == [1.5, 5.5, 9.5, 13.5]
    assert fired[-1] == (32.0, [TimedOut(Timer.F), Terminated()])  # F was not restarted


def test_client_non_invite_provisionals_are_delivered_in_proceeding() -> None:
    tx = ClientNonInviteTransaction(OPTIONS)
    tx.start(0.0)
    tx.receive_response(100, R100, 0.1)
    assert tx.receive_response(180, R180, 0.2) == [DeliverResponse(180, R180)]


@pytest.mark.parametrize("status", [200, 202, 302, 404, 503, 603])
@pytest.mark.parametrize("via_proceeding", [False, True])
def test_client_non_invite_final_completes_and_absorbs_retransmissions(
    status: int, via_proceeding: bool
) -> None:
    tx = ClientNonInviteTransaction(OPTIONS)
    tx.start(0.0)
    if via_proceeding:
        tx.receive_response(100, R100, 0.1)
    final = b"SIP/2.0 %d X\r\n\r\n" % status
    assert tx.receive_response(status, final, 2.0) == [DeliverResponse(status, final)]
    assert tx.state is State.COMPLETED
    assert tx.next_deadline() == 2.0 + T4  # Timer K; E and F stopped
    assert tx.receive_response(status, final, 2.5) == []
    assert tx.receive_response(100, R100, 2.6) == []
    assert tx.transport_error(2.7) == []
    assert tx.handle_timer(2.0 + T4) == [Terminated()]


def test_client_non_invite_reliable_no_e_and_zero_k() -> None:
    tx = ClientNonInviteTransaction(OPTIONS, reliable=True)
    tx.start(0.0)
    assert tx.next_deadline() == SIXTY_FOUR_T1  # Timer F only
    tx.receive_response(100, R100, 1.0)
    assert tx.next_deadline() == SIXTY_FOUR_T1
    assert tx.receive_response(200, R200, 2.0) == [DeliverResponse(200, R200), Terminated()]


def test_client_non_invite_reliable_timeout() -> None:
    tx = ClientNonInviteTransaction(OPTIONS, reliable=True)
    tx.start(0.0)
    assert run_timers(tx, 100.0) == [(SIXTY_FOUR_T1, [TimedOut(Timer.F), Terminated()])]


@pytest.mark.parametrize("via_proceeding", [False, True])
def test_client_non_invite_transport_error_terminates(via_proceeding: bool) -> None:
    tx = ClientNonInviteTransaction(OPTIONS)
    tx.start(0.0)
    if via_proceeding:
        tx.receive_response(100, R100, 0.1)
    assert tx.transport_error(0.6) == [TransportFailed(), Terminated()]
    assert tx.next_deadline() is None


def test_client_non_invite_rejected_inputs() -> None:
    tx = ClientNonInviteTransaction(OPTIONS)
    with pytest.raises(TransactionError):
        tx.receive_response(200, R200, 0.0)
    tx.start(0.0)
    with pytest.raises(TransactionError):
        tx.start(0.0)
    with pytest.raises(TransactionError):
        tx.receive_response(42, R200, 0.1)
    tx.receive_response(200, R200, 0.2)
    tx.handle_timer(10.0)
    assert tx.state is State.TERMINATED
    with pytest.raises(TransactionError):
        tx.receive_response(200, R200, 11.0)


# --- server INVITE (§17.2.1) -------------------------------------------------------------------


def test_server_invite_first_request_goes_to_tu() -> None:
    tx = ServerInviteTransaction()
    assert tx.receive_request(0.0) == [DeliverRequest()]
    assert tx.state is State.PROCEEDING
    assert tx.next_deadline() is None


def test_server_invite_retransmitted_request_replays_latest_provisional() -> None:
    tx = ServerInviteTransaction()
    tx.receive_request(0.0)
    assert tx.receive_request(0.5) == []  # nothing sent yet, nothing to replay
    assert tx.send_response(100, R100, 0.6) == [Send(R100)]
    assert tx.receive_request(1.0) == [Send(R100)]
    assert tx.send_response(180, R180, 1.2) == [Send(R180)]
    assert tx.receive_request(1.5) == [Send(R180)]
    assert tx.state is State.PROCEEDING
    assert tx.receive_ack(1.6) == []  # a stray ACK before any final


def test_server_invite_timer_g_doubles_up_to_t2_then_h_times_out() -> None:
    tx = ServerInviteTransaction()
    tx.receive_request(0.0)
    assert tx.send_response(486, R486, 1.0) == [Send(R486)]
    assert tx.state is State.COMPLETED
    fired = run_timers(tx, 1000.0)
    offsets = (0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5)
    assert fired[:-1] == [(1.0 + o, [Send(R486)]) for o in offsets]
    assert fired[-1] == (33.0, [TimedOut(Timer.H), Terminated()])  # the ACK never came


def test_server_invite_completed_replays_final_for_retransmitted_invite() -> None:
    tx = ServerInviteTransaction()
    tx.receive_request(0.0)
    tx.send_response(180, R180, 0.1)
    tx.send_response(486, R486, 1.0)
    assert tx.receive_request(1.2) == [Send(R486)]
    assert tx.next_deadline() == 1.5  # replay does not disturb Timer G


def test_server_invite_ack_confirms_and_timer_i_terminates() -> None:
    tx = ServerInviteTransaction()
    tx.receive_request(0.0)
    tx.send_response(486, R486, 1.0)
    tx.handle_timer(1.5)
    assert tx.receive_ack(2.0) == []  # the ACK for a non-2xx stops here
    assert tx.state is State.CONFIRMED
    assert tx.next_deadline() == 2.0 + T4  # Timer I only: G and H stopped
    assert tx.receive_ack(2.5) == []
    assert tx.receive_request(3.0) == []
    assert tx.transport_error(3.5) == []
    assert tx.handle_timer(2.0 + T4) == [Terminated()]


def test_server_invite_2xx_enters_accepted() -> None:
    tx = ServerInviteTransaction()
    tx.receive_request(0.0)
    tx.send_response(180, R180, 0.2)
    assert tx.send_response(200, R200, 1.0) == [Send(R200)]
    assert tx.state is State.ACCEPTED
    assert tx.next_deadline() == 1.0 + SIXTY_FOUR_T1  # Timer L; no retransmission of our own
    # RFC 6026 §7.1: INVITE retransmissions absorbed, TU's 2xx sent, ACKs passed up
    assert tx.receive_request(1.5) == []
    assert tx.send_response(200, R200, 2.0) == [Send(R200)]
    assert tx.send_response(200, R200_OTHER_FORK, 2.1) == [Send(R200_OTHER_FORK)]
    assert tx.receive_ack(2.5) == [DeliverAck()]
    assert tx.receive_ack(3.0) == [DeliverAck()]
    assert tx.handle_timer(1.0 + SIXTY_FOUR_T1) == [Terminated()]


@pytest.mark.parametrize("status", [100, 180, 486])
def test_server_invite_accepted_rejects_non_2xx_from_tu(status: int) -> None:
    tx = ServerInviteTransaction()
    tx.receive_request(0.0)
    tx.send_response(200, R200, 1.0)
    with pytest.raises(TransactionError):
        tx.send_response(status, R486, 1.1)
    assert tx.state is State.ACCEPTED


@pytest.mark.parametrize("acked", [False, True])
@pytest.mark.parametrize("status", [180, 200, 486])
def test_server_invite_no_response_after_final(acked: bool, status: int) -> None:
    tx = ServerInviteTransaction()
    tx.receive_request(0.0)
    tx.send_response(486, R486, 1.0)
    if acked:
        tx.receive_ack(1.1)
    with pytest.raises(TransactionError):
        tx.send_response(status, R200, 1.2)


def test_server_invite_reliable_no_g_and_zero_i() -> None:
    tx = ServerInviteTransaction(reliable=True)
    tx.receive_request(0.0)
    tx.send_response(486, R486, 1.0)
    assert tx.next_deadline() == 1.0 + SIXTY_FOUR_T1  # Timer H only
    assert tx.receive_ack(2.0) == [Terminated()]


def test_server_invite_reliable_timer_h() -> None:
    tx = ServerInviteTransaction(reliable=True)
    tx.receive_request(0.0)
    tx.send_response(603, R486, 1.0)
    assert run_timers(tx, 1000.0) == [(33.0, [TimedOut(Timer.H), Terminated()])]


def test_server_invite_reliable_accepted_still_waits_timer_l() -> None:
    tx = ServerInviteTransaction(reliable=True)
    tx.receive_request(0.0)
    tx.send_response(200, R200, 1.0)
    assert tx.next_deadline() == 1.0 + SIXTY_FOUR_T1
    assert tx.receive_ack(1.5) == [DeliverAck()]


@pytest.mark.parametrize("final", [None, 486, 200])
def test_server_invite_transport_error_terminates(final: int | None) -> None:
    tx = ServerInviteTransaction()
    tx.receive_request(0.0)
    tx.send_response(100, R100, 0.1)
    if final is not None:
        tx.send_response(final, R200, 0.5)
    assert tx.transport_error(0.6) == [TransportFailed(), Terminated()]
    assert tx.next_deadline() is None


def test_server_invite_rejected_inputs() -> None:
    tx = ServerInviteTransaction()
    with pytest.raises(TransactionError):
        tx.receive_ack(0.0)
    with pytest.raises(TransactionError):
        tx.send_response(100, R100, 0.0)
    with pytest.raises(TransactionError):
        tx.transport_error(0.0)
    tx.receive_request(0.0)
    with pytest.raises(TransactionError):
        tx.send_response(700, R200, 0.1)
    tx.send_response(200, R200, 0.2)
    tx.handle_timer(100.0)
    assert tx.state is State.TERMINATED
    for call in (
        lambda: tx.receive_request(101.0),
        lambda: tx.receive_ack(101.0),
        lambda: tx.send_response(200, R200, 101.0),
    ):
        with pytest.raises(TransactionError):
            call()


# --- server non-INVITE (§17.2.2) ---------------------------------------------------------------


def test_server_non_invite_trying_absorbs_retransmissions() -> None:
    tx = ServerNonInviteTransaction()
    assert tx.receive_request(0.0) == [DeliverRequest()]
    assert tx.state is State.TRYING
    assert tx.receive_request(0.5) == []


def test_server_non_invite_never_answers_on_its_own() -> None:
    tx = ServerNonInviteTransaction()
    tx.receive_request(0.0)
    # RFC 4320 §4.2: no timer in Trying/Proceeding, hence no 408 from the transaction layer
    assert tx.next_deadline() is None
    assert tx.handle_timer(1000.0) == []
    tx.send_response(100, R100, 1.0)
    assert tx.next_deadline() is None
    assert tx.handle_timer(2000.0) == []
    assert tx.abandon(2000.0) == [Terminated()]


def test_server_non_invite_abandon_from_trying() -> None:
    tx = ServerNonInviteTransaction()
    tx.receive_request(0.0)
    assert tx.abandon(32.0) == [Terminated()]


def test_server_non_invite_proceeding_replays_latest_provisional() -> None:
    tx = ServerNonInviteTransaction()
    tx.receive_request(0.0)
    assert tx.send_response(100, R100, 4.5) == [Send(R100)]
    assert tx.state is State.PROCEEDING
    assert tx.receive_request(5.0) == [Send(R100)]
    tx.send_response(183, R183, 5.5)
    assert tx.receive_request(6.0) == [Send(R183)]


@pytest.mark.parametrize("via_proceeding", [False, True])
@pytest.mark.parametrize("status", [200, 404])
def test_server_non_invite_final_completes_and_timer_j(via_proceeding: bool, status: int) -> None:
    tx = ServerNonInviteTransaction()
    tx.receive_request(0.0)
    if via_proceeding:
        tx.send_response(100, R100, 0.5)
    assert tx.send_response(status, R200, 1.0) == [Send(R200)]
    assert tx.state is State.COMPLETED
    assert tx.next_deadline() == 1.0 + SIXTY_FOUR_T1  # Timer J
    assert tx.receive_request(2.0) == [Send(R200)]
    with pytest.raises(TransactionError):
        tx.send_response(200, R200, 2.5)
    with pytest.raises(TransactionError):
        tx.abandon(2.5)
    assert tx.handle_timer(1.0 + SIXTY_FOUR_T1) == [Terminated()]


def test_server_non_invite_reliable_zero_j() -> None:
    tx = ServerNonInviteTransaction(reliable=True)
    tx.receive_request(0.0)
    assert tx.send_response(200, R200, 1.0) == [Send(R200), Terminated()]


@pytest.mark.parametrize("stage", ["trying", "proceeding", "completed"])
def test_server_non_invite_transport_error_terminates(stage: str) -> None:
    tx = ServerNonInviteTransaction()
    tx.receive_request(0.0)
    if stage != "trying":
        tx.send_response(100, R100, 0.1)
    if stage == "completed":
        tx.send_response(200, R200, 0.2)
    assert tx.transport_error(0.3) == [TransportFailed(), Terminated()]
    assert tx.next_deadline() is None


def test_server_non_invite_rejected_inputs() -> None:
    tx = ServerNonInviteTransaction()
    with pytest.raises(TransactionError):
        tx.send_response(200, R200, 0.0)
    with pytest.raises(TransactionError):
        tx.abandon(0.0)
    tx.receive_request(0.0)
    with pytest.raises(TransactionError):
        tx.send_response(99, R200, 0.1)
    tx.abandon(0.2)
    with pytest.raises(TransactionError):
        tx.receive_request(0.3)


# --- settings and events ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"t1": 0.0}, {"t1": -1.0}, {"t1": 5.0, "t2": 4.0}, {"t4": 0.0}, {"timer_d": -1.0}],
)
def test_timer_settings_reject_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TimerSettings(**kwargs)


def test_timer_settings_defaults_and_frozen() -> None:
    assert TimerSettings(t1=0.5, t2=4.0, t4=5.0, timer_d=32.0) == DEFAULT_TIMER_SETTINGS
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_TIMER_SETTINGS.t1 = 1.0  # type: ignore[misc]


def test_transactions_and_events_have_no_instance_dict() -> None:
    objects = [
        client_invite()[0],
        ClientNonInviteTransaction(OPTIONS),
        ServerInviteTransaction(),
        ServerNonInviteTransaction(),
        Send(b"x"),
        DeliverResponse(200, b"x"),
        TimedOut(Timer.B),
    ]
    for obj in objects:
        assert not hasattr(obj, "__dict__"), type(obj).__name__


# --- matching keys (§17.1.3, §17.2.3) ---------------------------------------------------------

BRANCH = "z9hG4bK776asdhds"
VIA = "SIP/2.0/UDP pc33.example.com;branch=z9hG4bK776asdhds"


def key3261(method: str, branch: str = BRANCH, sent_by: str = "pc33.example.com") -> tuple:
    # the 2543-only fields must not matter: pass values that differ per method
    return server_transaction_key(
        method, branch, sent_by, "sip:" + method, method, method, method, 1, method, method
    )


def key2543(
    method: str,
    *,
    to_tag: str | None = None,
    cseq_num: int = 1,
    via: str = "SIP/2.0/UDP pc33.example.com;branch=390skdjuw",
    branch: str | None = "390skdjuw",
    request_uri: str = "sip:700123456789012@example.com",
    from_tag: str = "9fxced76sl",
) -> tuple:
    return server_transaction_key(
        method,
        branch,
        "pc33.example.com",
        request_uri,
        from_tag,
        to_tag,
        "3848276298220188511@pc33.example.com",
        cseq_num,
        method,  # a request's CSeq method is its method (§8.1.1.5)
        via,
    )


def test_rfc3261_key_ack_matches_invite_cancel_does_not() -> None:
    invite = key3261("INVITE")
    assert key3261("ACK") == invite
    assert key3261("CANCEL") != invite
    assert cancelled_invite_key(key3261("CANCEL")) == invite
    assert key3261("BYE") != invite


def test_rfc3261_key_uses_branch_and_sent_by() -> None:
    invite = key3261("INVITE")
    assert key3261("INVITE", branch="z9hG4bK776asdhdt") != invite
    assert key3261("INVITE", sent_by="pc34.example.com") != invite  # same branch, other client
    assert key3261("INVITE", sent_by="PC33.Example.COM") == invite  # host names ignore case


def test_magic_cookie_alone_is_no_transaction_id() -> None:
    # RFC 4475 §3.2.1 (badbranch): "z9hG4bK" with nothing after falls back to RFC 2543 rules
    assert not is_rfc3261_branch("z9hG4bK")
    assert not is_rfc3261_branch(None)
    assert not is_rfc3261_branch("390skdjuw")
    assert not is_rfc3261_branch("Z9HG4BKabc")
    assert is_rfc3261_branch(BRANCH)
    assert key2543("OPTIONS", branch="z9hG4bK") == key2543("OPTIONS", branch="390skdjuw")
    assert key2543("OPTIONS", branch="z9hG4bK") == key2543("OPTIONS", branch=None)


def test_rfc2543_key_never_equals_a_3261_key() -> None:
    assert len(key2543("INVITE")) != len(key3261("INVITE"))
    assert key2543("INVITE") != key3261("INVITE")


def test_rfc2543_invite_retransmission_and_ack_match() -> None:
    invite = key2543("INVITE")
    assert key2543("INVITE") == invite
    # the ACK carries the To tag of the 4xx the server sent; the INVITE had none
    assert key2543("ACK", to_tag="8321234356") == invite
    assert key2543("ACK", to_tag="8321234356", cseq_num=2) != invite
    assert key2543("ACK", via="SIP/2.0/UDP other.example.com") != invite
    assert key2543("ACK", request_uri="sip:other@example.com") != invite
    assert key2543("ACK", from_tag="otherTag") != invite


def test_rfc2543_cancel_is_its_own_transaction_but_finds_its_invite() -> None:
    invite = key2543("INVITE")
    cancel = key2543("CANCEL")
    assert cancel != invite
    assert cancelled_invite_key(cancel) == invite


def test_rfc2543_non_invite_key_includes_to_tag_and_method() -> None:
    bye = key2543("BYE", to_tag="a6c85cf", cseq_num=2)
    assert key2543("BYE", to_tag="a6c85cf", cseq_num=2) == bye
    assert key2543("BYE", to_tag="other", cseq_num=2) != bye
    assert key2543("INFO", to_tag="a6c85cf", cseq_num=2) != bye


def test_client_key_separates_cancel_from_invite() -> None:
    assert client_transaction_key(BRANCH, "INVITE") == client_transaction_key(BRANCH, "INVITE")
    assert client_transaction_key(BRANCH, "CANCEL") != client_transaction_key(BRANCH, "INVITE")
    assert client_transaction_key(BRANCH + "x", "INVITE") != client_transaction_key(
        BRANCH, "INVITE"
    )


# --- properties -------------------------------------------------------------------------------

STATUSES = st.sampled_from([0, 99, 100, 180, 183, 200, 202, 302, 404, 408, 486, 503, 603, 700])
DELAYS = st.floats(min_value=0.0, max_value=40.0, allow_nan=False)


def _client_ops() -> st.SearchStrategy:
    return st.one_of(
        st.just(("start",)),
        st.tuples(st.just("response"), STATUSES),
        st.just(("timer",)),
        st.just(("transport_error",)),
    )


def _server_ops(invite: bool) -> st.SearchStrategy:
    ops = [
        st.just(("request",)),
        st.tuples(st.just("send"), STATUSES),
        st.just(("timer",)),
        st.just(("transport_error",)),
        st.just(("ack",) if invite else ("abandon",)),
    ]
    return st.one_of(*ops)


def _apply(tx: object, op: tuple, now: float) -> list[Event]:
    name = op[0]
    if name == "response":
        return tx.receive_response(op[1], b"%d" % op[1], now)  # type: ignore[attr-defined]
    if name == "send":
        return tx.send_response(op[1], b"%d" % op[1], now)  # type: ignore[attr-defined]
    method: Callable[[float], list[Event]] = getattr(
        tx,
        {
            "start": "start",
            "request": "receive_request",
            "ack": "receive_ack",
            "abandon": "abandon",
            "timer": "handle_timer",
            "transport_error": "transport_error",
        }[name],
    )
    return method(now)


def _finish(tx: object, now: float) -> None:
    """Supply what a transaction waits for that no timer will bring (a peer's or TU's final)."""
    state = tx.state  # type: ignore[attr-defined]
    if isinstance(tx, (ClientInviteTransaction, ClientNonInviteTransaction)):
        if state is State.INIT:
            tx.start(now)
        elif state is State.PROCEEDING and isinstance(tx, ClientInviteTransaction):
            tx.receive_response(486, b"486", now)
    else:
        if state is State.INIT:
            tx.receive_request(now)
        if tx.state in (State.TRYING, State.PROCEEDING):  # type: ignore[attr-defined]
            tx.send_response(500, b"500", now)  # type: ignore[attr-defined]


MACHINES = {
    "client_invite": (lambda r: client_invite(reliable=r)[0], _client_ops()),
    "client_non_invite": (lambda r: ClientNonInviteTransaction(OPTIONS, reliable=r), _client_ops()),
    "server_invite": (lambda r: ServerInviteTransaction(reliable=r), _server_ops(True)),
    "server_non_invite": (lambda r: ServerNonInviteTransaction(reliable=r), _server_ops(False)),
}


@pytest.mark.parametrize("machine", sorted(MACHINES))
@settings(max_examples=300, deadline=None)
@given(data=st.data(), reliable=st.booleans())
def test_random_inputs_only_raise_transaction_error_and_always_end(
    machine: str, data: st.DataObject, reliable: bool
) -> None:
    make, op_strategy = MACHINES[machine]
    tx = make(reliable)
    steps = data.draw(st.lists(st.tuples(op_strategy, DELAYS), max_size=25))
    now = 0.0
    terminations = 0
    for op, delay in steps:
        now += delay
        was_terminated = tx.state is State.TERMINATED
        try:
            events = _apply(tx, op, now)
        except TransactionError:
            continue  # the only exception allowed
        terminations += events.count(Terminated())
        if was_terminated:
            assert events == []  # only a stale timer call gets through once terminated
        if Terminated() in events:
            assert events[-1] == Terminated()
            assert tx.state is State.TERMINATED
            assert tx.next_deadline() is None
        if op[0] == "timer":
            deadline = tx.next_deadline()
            assert deadline is None or deadline > now  # the due timer was handled
    assert terminations == (1 if tx.state is State.TERMINATED else 0)
    _finish(tx, now)
    # every timer-driven end (B, D, F, H, I, J, K, L, M) lies within 64*T1 + T4 of the last input
    end = now + SIXTY_FOUR_T1 + T4
    tx.handle_timer(end)
    assert tx.state is State.TERMINATED
    assert tx.next_deadline() is None


@settings(max_examples=200, deadline=None)
@given(
    t1=st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0, 2.0]),
    t2_factor=st.sampled_from([1, 2, 4, 8, 16]),
    invite=st.booleans(),
)
def test_retransmission_intervals_follow_t1_and_t2(t1: float, t2_factor: int, invite: bool) -> None:
    timers = TimerSettings(t1=t1, t2=t1 * t2_factor)
    tx: ClientInviteTransaction | ClientNonInviteTransaction
    if invite:
        tx = client_invite(settings=timers)[0]
    else:
        tx = ClientNonInviteTransaction(OPTIONS, settings=timers)
    tx.start(0.0)
    fired = run_timers(tx, 1e9)
    *retransmissions, (end, last) = fired
    assert end == pytest.approx(64 * t1)
    assert last[0] == TimedOut(Timer.B if invite else Timer.F)
    times = [0.0] + [t for t, _ in retransmissions]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for k, gap in enumerate(gaps):
        expected = t1 * 2**k if invite else min(t1 * 2**k, timers.t2)
        assert gap == pytest.approx(expected)
    # and no retransmission is due at or after the timeout
    assert times[-1] < 64 * t1
