"""One worker takes every new call while the load is low; the kernel spreads them otherwise.

Why: at 1,000 calls a second two workers each sleep between most datagrams, and waking a
sleeping worker (the kernel's switch, cold caches) is most of what a call costs there. One
worker taking everything measured 7-17 % less CPU a call than two (README, 2026-12-06). Above
what one worker carries comfortably, the Call-ID program (proxy/spread.py) spreads new calls
over every worker again.

How (transport.py does the I/O, this module the state and the decision):
- The workers share a `Board`, an anonymous shared mapping the supervisor makes before it
  forks them: the mode (spread or single), when it last changed, each worker's CPU over the
  last second, and which worker holds which socket of each shared UDP port's reuseport group
  (the kernel numbers the sockets in the order they joined, not by worker: each worker learns
  its own number from the datagrams the Call-ID program gave it).
- Worker 0 decides (`Controller`): single once every worker's CPU summed has stayed under
  `transport.low_load.enter_percent` for `hold_s`; spread again as soon as one worker passes
  `leave_percent`, worker 0's oldest datagram has waited LEAVE_WAIT_S, or any worker sheds.
  It writes the board first and attaches the new program SWITCH_DELAY_S later, so every
  worker (which reads the board each 10 ms tick) knows of the change before the kernel
  applies it. A worker that starts (or restarts)
  attaches the Call-ID program, as before, and says so on the board.
- Calls in progress stay where they are. Responses and in-dialog requests name their worker's
  own port (Via, Record-Route) and get there whatever the kernel picks. What does not name it
  (an INVITE's retransmission, its CANCEL, the ACK of a non-2xx answer) may land on the other
  worker after a change: for a while after each change (`handoff_windows`) a worker that does
  not hold such a request's transaction passes it to the worker the other mode would have
  picked, which does.
"""

from __future__ import annotations

import mmap
import struct
import time
from typing import Final, Protocol

SPREAD: Final = 0
SINGLE: Final = 1
CONTROLLER: Final = 0  # the worker that decides, and takes every new call in SINGLE
SWITCH_DELAY_S: Final = 0.05  # board written, then the program attached: 5 ticks
# an INVITE's retransmissions: the caller sends it again 0.5 s (T1) and 1.5 s after it, only
# while it has no provisional answer, and the proxy's 100 Trying leaves within
# timers.trying_after_ms (200). In the window a new INVITE goes where the other mode would have
# sent it. Into SINGLE the load is low: both retransmissions are covered. Out of it, none: the
# window's new INVITEs would all be worker 0's, whose load is what ends SINGLE, and the backlog
# they make is what delays a provisional past 0.5 s (a step from 1,000 to 4,000 CPS, measured:
# with 2 s, 844 calls shed; with 0.5 s, INVITE→200 p99 105-202 ms; with none, 23-41 ms, A
# alone 10-20 ms). SINGLE ends at 50 ms of wait, so an INVITE sent before the change has its
# provisional within about 300 ms: its retransmission is one whose provisional was lost.
INVITE_WINDOW_S: Final = 2.0
LEAVE_INVITE_WINDOW_S: Final = 0.0
# the oldest datagram's wait in the receive queue (one 10 ms tick) past which SINGLE ends at
# once, without waiting for the second's CPU: a burst the one worker cannot read in time
LEAVE_WAIT_S: Final = 0.05
# the hold before the first SINGLE: two readings of a second, so that a reading that began
# before the traffic did (a proxy started into a full load) is not taken for a low load
FIRST_HOLD_S: Final = 1.5
LEARN_AFTER_S: Final = 1.5  # a sample older than the last change says nothing of the new one
ACK_GRACE_S: Final = 40.0  # after Timer C: the final answer's retransmissions, then its ACK

_MODE: Final = struct.Struct("=i")
_READY: Final = struct.Struct("=i")  # at offset 4
_CHANGED: Final = struct.Struct("=d")  # at offset 8: time.monotonic (system-wide)
_HEAD_SIZE: Final = 16
_CPU: Final = struct.Struct("=d")
_OWNER: Final = struct.Struct("=i")  # worker + 1 holding a socket index; 0: not known


class Board:
    """The workers' shared state (see the module's docstring). Every field has one writer at a
    time: the mode the controller (or a worker starting), a CPU its worker, an owner entry
    the worker that holds that socket."""

    def __init__(self, workers: int, groups: int) -> None:
        self.workers = workers
        self.groups = groups
        self._cpu_at = _HEAD_SIZE
        self._owner_at = self._cpu_at + _CPU.size * workers
        size = self._owner_at + _OWNER.size * groups * workers
        self._map = mmap.mmap(-1, size)  # MAP_SHARED | MAP_ANONYMOUS: shared across fork

    # ---- the mode ------------------------------------------------------------------------
    @property
    def mode(self) -> int:
        return _MODE.unpack_from(self._map, 0)[0]

    @property
    def changed_at(self) -> float:
        return _CHANGED.unpack_from(self._map, 8)[0]

    def set_mode(self, mode: int, now: float) -> None:
        _CHANGED.pack_into(self._map, 8, now)  # the time first: a reader of the new mode
        _MODE.pack_into(self._map, 0, mode)  # sees the window that goes with it

    @property
    def ready(self) -> bool:
        """Every worker has bound the shared ports (the supervisor's word): until then a
        datagram the program meant for a socket not there yet went elsewhere, and says nothing
        of who holds which."""
        return bool(_READY.unpack_from(self._map, 4)[0])

    def set_ready(self, ready: bool) -> None:
        _READY.pack_into(self._map, 4, int(ready))

    # ---- CPU -------------------------------------------------------------------------------
    def set_cpu(self, worker: int, percent: float) -> None:
        _CPU.pack_into(self._map, self._cpu_at + _CPU.size * worker, percent)

    def cpus(self) -> list[float]:
        return [_CPU.unpack_from(self._map, self._cpu_at + _CPU.size * w)[0]
                for w in range(self.workers)]

    # ---- who holds which socket ------------------------------------------------------------
    def _slot(self, group: int, index: int) -> int:
        return self._owner_at + _OWNER.size * (group * self.workers + index)

    def set_owner(self, group: int, index: int, worker: int) -> None:
        if 0 <= group < self.groups and 0 <= index < self.workers:
            _OWNER.pack_into(self._map, self._slot(group, index), worker + 1)

    def owner(self, group: int, index: int) -> int | None:
        """The worker holding socket `index` of group `group`, if learned since the last
        forget()."""
        if not (0 <= group < self.groups and 0 <= index < self.workers):
            return None
        held = _OWNER.unpack_from(self._map, self._slot(group, index))[0]
        return held - 1 if held else None

    def index_of(self, group: int, worker: int) -> int | None:
        for index in range(self.workers):
            if self.owner(group, index) == worker:
                return index
        return None

    def forget(self) -> None:
        """A worker joined a group (it restarted): the kernel may have renumbered them all."""
        for group in range(self.groups):
            for index in range(self.workers):
                _OWNER.pack_into(self._map, self._slot(group, index), 0)


class Thresholds(Protocol):
    """What the controller reads of transport.low_load (proxy/config.py's LowLoadConfig)."""

    enter_percent: float  # every worker's CPU summed (% of one core), held hold_s: SINGLE
    leave_percent: float  # one worker's CPU (% of one core) above it: SPREAD
    hold_s: float


class Controller:
    """Worker 0's decision, once a second (pure: the transport samples and switches)."""

    def __init__(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds
        self._low_since: float | None = None
        # a short hold until the load has once ended SINGLE: the hold keeps a load near the
        # thresholds from switching back and forth; a proxy just started is simply idle
        self._loaded = False

    def decide(self, mode: int, cpus: list[float], now: float, *, shedding: bool,
               indexes_known: bool) -> int | None:
        """The mode to switch to, or None to stay."""
        t = self.thresholds
        if mode == SINGLE:
            self._low_since = None
            if shedding or max(cpus) > t.leave_percent:
                self._loaded = True
                return SPREAD
            return None
        if shedding or sum(cpus) >= t.enter_percent or not indexes_known:
            self._low_since = None
            return None
        if self._low_since is None:
            self._low_since = now
        if now - self._low_since >= (t.hold_s if self._loaded else FIRST_HOLD_S):
            self._low_since = None
            return SINGLE
        return None


    def loaded(self) -> None:
        """SINGLE ended for a burst the tick saw (the receive queue's wait): from now on the
        hold applies."""
        self._loaded = True


class CpuMeter:
    """This process's CPU (user + system, every thread) as a percentage of one core, over the
    time since the last reading."""

    def __init__(self) -> None:
        self._cpu = time.process_time()
        self._at = time.monotonic()

    def read(self, now: float) -> float:
        cpu = time.process_time()
        spent, elapsed = cpu - self._cpu, now - self._at
        self._cpu, self._at = cpu, now
        return 100.0 * spent / elapsed if elapsed > 0 else 0.0


def handoff_windows(changed_at: float, mode: int, timer_c_s: float) -> tuple[float, float]:
    """Until when, after a change to `mode` at `changed_at`, a request with no transaction here
    may be another worker's: (CANCEL and the ACK of a non-2xx answer: a call may ring for
    Timer C, then its final answer is retransmitted until acknowledged; an INVITE: its
    retransmissions)."""
    if changed_at <= 0.0:
        return 0.0, 0.0
    invite = INVITE_WINDOW_S if mode == SINGLE else LEAVE_INVITE_WINDOW_S
    return changed_at + timer_c_s + ACK_GRACE_S, changed_at + invite
