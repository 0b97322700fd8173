"""proxy/steering.py: the shared board across a fork, the controller's decision, the windows."""

from __future__ import annotations

import os
import time

import pytest

from proxy import steering
from proxy.config import LowLoadConfig
from proxy.steering import SINGLE, SPREAD, Board, Controller

T = LowLoadConfig(enter_percent=30.0, leave_percent=60.0, hold_s=10.0)


def test_the_board_is_shared_with_a_forked_worker() -> None:
    board = Board(workers=2, groups=2)
    assert board.mode == SPREAD and board.changed_at == 0.0 and not board.ready
    assert board.owner(0, 0) is None and board.index_of(1, 1) is None
    pid = os.fork()
    if pid == 0:  # the "worker": writes what the others read
        board.set_mode(SINGLE, 123.5)
        board.set_cpu(1, 42.0)
        board.set_owner(1, 0, 1)
        board.set_ready(True)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert (board.mode, board.changed_at, board.ready) == (SINGLE, 123.5, True)
    assert board.cpus() == [0.0, 42.0]
    assert board.owner(1, 0) == 1 and board.index_of(1, 1) == 0
    assert board.owner(0, 0) is None  # another group's numbering is its own
    board.forget()
    assert board.owner(1, 0) is None and board.index_of(1, 1) is None


def test_the_board_ignores_places_it_does_not_have() -> None:
    board = Board(workers=2, groups=1)
    board.set_owner(1, 0, 0)
    board.set_owner(0, 2, 0)
    board.set_owner(0, -1, 0)
    assert [board.owner(g, i) for g in (0, 1) for i in (-1, 0, 1, 2)] == [None] * 8


def loaded_controller() -> Controller:
    """A controller whose SINGLE a load has ended once: the hold applies from then on."""
    c = Controller(T)
    assert c.decide(SINGLE, [70.0, 1.0], 0.0, shedding=False, indexes_known=True) == SPREAD
    return c


def test_a_proxy_never_loaded_takes_one_worker_after_two_low_seconds() -> None:
    c = Controller(T)
    assert c.decide(SPREAD, [10.0, 12.0], 100.0, shedding=False, indexes_known=False) is None
    assert c.decide(SPREAD, [25.0, 12.0], 101.0, shedding=False, indexes_known=True) is None
    assert c.decide(SPREAD, [10.0, 12.0], 102.0, shedding=False, indexes_known=True) is None
    assert c.decide(SPREAD, [10.0, 12.0], 103.0, shedding=False, indexes_known=True) is None
    assert c.decide(SPREAD, [10.0, 12.0], 104.0, shedding=False, indexes_known=True) == SINGLE


def test_once_loaded_one_worker_only_after_the_sum_stays_low_for_the_hold() -> None:
    c = loaded_controller()
    assert c.decide(SPREAD, [10.0, 12.0], 100.0, shedding=False, indexes_known=True) is None
    assert c.decide(SPREAD, [10.0, 12.0], 105.0, shedding=False, indexes_known=True) is None
    assert c.decide(SPREAD, [10.0, 12.0], 110.0, shedding=False, indexes_known=True) == SINGLE


def test_a_burst_the_tick_saw_makes_the_hold_apply() -> None:
    c = Controller(T)
    c.loaded()
    assert c.decide(SPREAD, [1.0, 1.0], 100.0, shedding=False, indexes_known=True) is None


@pytest.mark.parametrize("interruption", [
    {"cpus": [20.0, 15.0]},  # the sum, not each: 35 % is not low
    {"shedding": True},
    {"indexes_known": False},  # which socket is worker 0's is not learned yet
])
def test_the_hold_starts_again_after_any_interruption(interruption: dict) -> None:
    c = loaded_controller()
    base = {"cpus": [10.0, 10.0], "shedding": False, "indexes_known": True}
    assert c.decide(SPREAD, now=100.0, **base) is None
    assert c.decide(SPREAD, now=105.0, **{**base, **interruption}) is None
    assert c.decide(SPREAD, now=112.0, **base) is None  # 7 s of the 10 since
    assert c.decide(SPREAD, now=122.0, **base) == SINGLE


def test_spread_again_as_soon_as_one_worker_is_busy_or_any_sheds() -> None:
    c = Controller(T)
    assert c.decide(SINGLE, [59.0, 0.5], 1.0, shedding=False, indexes_known=True) is None
    assert c.decide(SINGLE, [61.0, 0.5], 2.0, shedding=False, indexes_known=True) == SPREAD
    assert c.decide(SINGLE, [1.0, 61.0], 3.0, shedding=False, indexes_known=True) == SPREAD
    assert c.decide(SINGLE, [5.0, 0.5], 4.0, shedding=True, indexes_known=True) == SPREAD


def test_the_cpu_meter_reads_this_process() -> None:
    meter = steering.CpuMeter()
    start = time.monotonic()
    while time.monotonic() - start < 0.2:  # busy: about 100 % of a core
        pass
    busy = meter.read(time.monotonic())
    time.sleep(0.2)  # idle: about 0
    idle = meter.read(time.monotonic())
    assert busy > 50.0 and idle < 20.0, (busy, idle)


def test_the_windows_follow_a_change_and_none_before_any() -> None:
    assert steering.handoff_windows(0.0, SPREAD, 180.0) == (0.0, 0.0)
    long, invite = steering.handoff_windows(1000.0, SINGLE, 180.0)
    assert invite == 1000.0 + steering.INVITE_WINDOW_S
    assert long == 1000.0 + 180.0 + steering.ACK_GRACE_S
    # out of SINGLE: no INVITE window (its INVITEs would all be the busy worker 0's)
    long, invite = steering.handoff_windows(1000.0, SPREAD, 180.0)
    assert invite == 1000.0 + steering.LEAVE_INVITE_WINDOW_S == 1000.0
    assert long == 1000.0 + 180.0 + steering.ACK_GRACE_S
