#!/usr/bin/env python3
"""Per-call CPU cost of the proxy core, without sockets (messages shuttled in memory), set up
the way `sip700 run` sets it up and driven the way the shared bench harness drives it.

- Config: config/proxy.yaml with the harness's addresses (the proxy on 127.0.0.1:15060, its
  gateway the SIPp UAS on 127.0.0.1:15070, callers from 127.0.0.1:15080) and a temporary
  bindings file of N AXB bindings, A = 13800000000 + i, X = 700100000000001 + i % 1000,
  B = 13900000000 + (i * 7919 + 12345) mod 10^8 (the harness's gen_csv.py), loaded by the memory
  backend; `load_config`, then `proxy.cli.build_core`, so every setting and the call log are
  those of `sip700 run`. The GC is tuned as `serve` tunes it.
- Logging on: `configure_logging` with the config's level and format (info, json), its writer
  pointed at /dev/null: each call's log line is rendered and written as in production, without
  flooding the terminal (outside an event loop the writer writes each record at once: one
  write(2) per call, where the shell batches an event-loop pass's records into one).
- Calls: call k comes from binding k mod N, so from a different A each (CALLS x ROUNDS <= N),
  as the SIPp pair makes them: INVITE (Contact, P-Asserted-Identity and SDP o= carry A) ->
  (100 only with --trying-after-ms 0) -> 180, 200 (Contact and SDP o= carry B) -> ACK -> hold
  -> BYE -> 200. The binding lookup is resolved as the shell's flush resolves it
  (`store.resolve_cached`, then `complete_lookup`).
- Time: a simulated clock. Call k starts at k / CPS; the UAS answers and the caller ACKs 1 ms
  apart, the BYE comes after the hold time. The shell's 10 ms tick runs on the same clock
  (`handle_timers(now)` whenever `next_deadline()` is due), so whatever the core arms (the
  transactions' timers, Timer C, the wait after a 2xx, a stateless forward's life) is re-armed,
  cancelled and fired as in production; after the last call of a round the clock runs 40 s on
  so every transaction's end-of-life timers fire too (counted; the idle ticks of that drain are
  skipped, those during the round are counted), and what is left of the core's
  per-transaction state is reported (0, or the bench fails).
- Privacy: every CHECK_EVERY-th call is checked like the harness's SIPp scenarios check it: no
  message the callee side receives carries A, none the caller side receives carries B, B gets
  R-URI user B and From / To / P-Asserted-Identity user X, the 200 gives A its own From back.
  A failed check stops the bench: a benchmark that silently stops rewriting is worthless.

- Collector: as in a worker (`proxy.worker.YoungCollector`): the young generation is collected
  every 50 ms of the simulated clock, the middle one every fourth time, so what a call keeps
  alive past that is walked as it is in production.

Figures: process CPU time (time.process_time) inside the core's entry points only, per call:
the calls phase (receive_datagram and the lookup step), the timers phase (the ticks) and the
young collections; best and median of ROUNDS rounds, after a warm-up round.

Usage:
    python3 scripts/bench_core.py [CALLS] [--bindings N] [--rounds R] [--cps RATE]
                                  [--hold-ms MS] [--check-every K] [--warmup W]
                                  [--profile [--sort KEY]]
    CALLS          calls per round (default 5000)
    --bindings N   bindings loaded, one caller each (default 100000, as the harness)
    --rounds R     measured rounds (default 5)
    --cps RATE     calls started per simulated second (default 500: one worker's share of
                   the ~1,000 CPS two workers sustain end to end)
    --hold-ms MS   pause between ACK and BYE (default 100, the harness's HOLD_MS)
    --check-every K  privacy-check every K-th call (default 50; 1 = every call, 0 = the
                   first of each round only)
    --warmup W     calls of the unmeasured warm-up round (default 200)
    --max-call-s S policy.max_call_s: each answered call is remembered for ending it at S
                   (never reached in a round: what is measured is what every call pays)
    --shape S      production (default: A and B in Contact and SDP o=, as real UAs) or harness
                   (the shared harness's own rows: no number there, as ../shared/bench)
    --trying-after-ms MS  timers.trying_after_ms (default: the config's 200, so the 180 a
                   millisecond later makes the 100 moot; 0 sends a 100 per INVITE)
    --evict-kb KB  before each datagram, outside the timed part, write one byte in every
                   64-byte line of a KB KiB buffer: the caches are as cold as a worker finds
                   them when it wakes for one datagram at a low rate, after the SIPp processes
                   (and on a VM, its neighbours) ran on its CPU. With 8192 the core's CPU a
                   call grows by what a worker's user time a call grows from 2,500 to 1,000
                   CPS on the 2-core VM (1.5-1.6x); 0 (the default) is the warm core, as
                   under load
    --profile      one round under cProfile (the core's entry points only), sorted by
                   cumulative time (--sort tottime for own time)
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import gc
import heapq
import math
import os
import pstats
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml

# this checkout's package, not whichever one is installed (a worktree measured against another)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy import logs
from proxy.bindings.memory import MemoryStore
from proxy.cli import build_core, dialog_key
from proxy.config import load_config
from proxy.worker import YoungCollector

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "config" / "proxy.yaml"

IP = "127.0.0.1"
PROXY = (IP, 15060)
UAS = (IP, 15070)  # the carrier gateway: the SIPp callee
UAC = (IP, 15080)  # the SIPp caller
SIPP_PID = 4242  # SIPp writes its pid into tags, branches and Call-IDs

TICK_S = 0.01  # proxy/transport.py TICK_S: how often the shell looks at the core's timers
# what the numbers sit in besides From, To and PAI: "production" puts A and B in Contact and SDP
# o= as real UAs do; "harness" sends the shared harness's exact rows (Contact sip:uac@ / a user-
# less one, SDP o=user1 / o=uas), so the figure compares with ../shared/bench end to end
SHAPE = {"shape": "production"}
UAS_DELAY_S = 0.001  # between the INVITE and the 180, the 180 and the 200, the 200 and the ACK
DRAIN_S = 40.0  # after a round: longer than any end-of-life timer (64 * T1 = 32 s)
NX = 1000  # the harness's middle-number pool


class BenchError(Exception):
    """The flow broke or a privacy check failed: the figures would mean nothing."""


def numbers(i: int) -> tuple[str, str, str]:
    """(A, X, B) of binding i, as the harness's gen_csv.py makes them."""
    return (str(13800000000 + i), str(700100000000001 + i % NX),
            str(13900000000 + (i * 7919 + 12345) % 100000000))


# ---- setup: config, store, logging, as `sip700 run` --------------------------------------------

def write_config(directory: Path, n: int, records: bool = False,
                 max_call_s: int | None = None, trying_after_ms: int | None = None) -> Path:
    """config/proxy.yaml with the harness's addresses, a bindings file of n AXB bindings and a
    dialog key; returns the config's path."""
    bindings = directory / "bindings.yaml"
    with bindings.open("w", encoding="utf-8") as f:
        f.write("bindings:\n")
        for i in range(n):
            a, x, b = numbers(i)
            f.write(f'  - {{type: axb, x: "{x}", a: "{a}", b: "{b}", ttl: 86400}}\n')
    data = yaml.safe_load(BASE_CONFIG.read_text(encoding="utf-8"))
    data["listen"] = [f"udp:{PROXY[0]}:{PROXY[1]}"]
    data["advertise"] = f"{PROXY[0]}:{PROXY[1]}"
    data.setdefault("carrier", {})["gateways"] = [f"sip:{UAS[0]}:{UAS[1]}"]
    store = data.setdefault("store", {})
    store["backend"] = "memory"
    store["bindings_file"] = bindings.name  # relative to the config's directory
    privacy = data.setdefault("privacy", {})
    privacy.pop("dialog_key_file", None)
    privacy["dialog_key"] = base64.b64encode(os.urandom(32)).decode()
    if records:  # never connected: the bench encodes the batches, it does not send them
        data["records"] = {"enabled": True, "redis_url": "redis://127.0.0.1:1/0",
                           "spool_dir": str(directory / "spool")}
    if max_call_s is not None:  # every answered call gets a limit (policy.max_call_s)
        data.setdefault("policy", {})["max_call_s"] = max_call_s
    if trying_after_ms is not None:
        data.setdefault("timers", {})["trying_after_ms"] = trying_after_ms
    path = directory / "proxy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


class DevNullLogging:
    """`configure_logging` with its writer on /dev/null; the previous set-up back on exit.

    proxy/logs.py makes its writer once per process, on sys.stdout's descriptor: stdout is
    /dev/null while it does, and the module's writer is reset so it is made again.
    """

    def __init__(self, level: str, fmt: str) -> None:
        self.level, self.fmt = level, fmt

    def __enter__(self) -> logs.NonBlockingLineWriter:
        self.saved_config = structlog.get_config()
        self.saved_writer = logs._writer
        self.devnull = open(os.devnull, "w")  # closed in __exit__
        saved_stdout = sys.stdout
        sys.stdout = self.devnull
        try:
            logs._writer = None
            logs.configure_logging(self.level, self.fmt)
        finally:
            sys.stdout = saved_stdout
        writer = logs._writer
        fd = getattr(writer, "_fd", None)
        null = os.stat(os.devnull)
        if writer is None or fd is None or (os.fstat(fd).st_ino, os.fstat(fd).st_rdev) != (
                null.st_ino, null.st_rdev):
            self.__exit__()
            raise BenchError("proxy/logs.py no longer takes its writer from sys.stdout: "
                             "update DevNullLogging")
        return writer

    def __exit__(self, *exc: object) -> None:
        # the writer keeps its own descriptor (it reopens /dev/null non-blocking): left open, a
        # logger cached on it can never write into a file that reuses the number
        logs._writer = self.saved_writer
        structlog.configure(**self.saved_config)
        self.devnull.close()


def open_memory_store(cfg: Any) -> MemoryStore:
    """What `open_store_frozen` does for the memory backend (without its start-up log line)."""
    store = MemoryStore()
    _loaded, problems = store.load_file(cfg.store.bindings_file)
    if problems:
        raise BenchError(f"bindings file: {problems[0]}")
    gc.collect()
    gc.freeze()
    return store


# ---- the SIPp pair's messages -----------------------------------------------------------------

_COMPACT = {b"v": b"via", b"f": b"from", b"t": b"to", b"i": b"call-id", b"m": b"contact"}
_URI_USER = re.compile(rb"sips?:([^@;> ]+)@")
_ANGLE = re.compile(rb"<([^>]*)>")


def header_rows(data: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-case long name, whole row) of each header row."""
    head = data.split(b"\r\n\r\n", 1)[0]
    rows = []
    for row in head.split(b"\r\n")[1:]:
        name = row.split(b":", 1)[0].strip().lower()
        rows.append((_COMPACT.get(name, name), row))
    return rows


def header_value(row: bytes) -> bytes:
    return row.split(b":", 1)[1].strip()


def sdp(user: str) -> bytes:
    return (f"v=0\r\no={user} 53655765 2353687637 IN IP4 {IP}\r\ns=-\r\nc=IN IP4 {IP}\r\n"
            f"t=0 0\r\nm=audio 6000 RTP/AVP 8 0\r\na=rtpmap:8 PCMA/8000\r\n"
            f"a=rtpmap:0 PCMU/8000\r\n").encode()


def invite(k: int, a: str, x: str) -> bytes:
    """The caller's INVITE (shared harness uac.xml, with A in Contact and SDP as a real UA)."""
    harness = SHAPE["shape"] == "harness"
    body = sdp("user1" if harness else a)
    contact = "uac" if harness else a
    return (
        f"INVITE sip:{x}@{PROXY[0]}:{PROXY[1]} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {UAC[0]}:{UAC[1]};branch=z9hG4bK-{SIPP_PID}-{k}-0\r\n"
        f"From: <sip:{a}@{UAC[0]}>;tag={SIPP_PID}SIPpTag00{k}\r\n"
        f"To: <sip:{x}@{PROXY[0]}:{PROXY[1]}>\r\n"
        f"Call-ID: {k}-{SIPP_PID}@{UAC[0]}\r\n"
        f"CSeq: 1 INVITE\r\n"
        f"Contact: <sip:{contact}@{UAC[0]}:{UAC[1]}>\r\n"
        f"P-Asserted-Identity: <sip:{a}@{UAC[0]}>\r\n"
        f"X-Bench-Id: {k}\r\n"
        f"Max-Forwards: 70\r\n"
        f"Subject: AXB bench\r\n"
        f"Content-Type: application/sdp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def uas_reply(request: bytes, status: int, reason: str, k: int, b: str, body: bool) -> bytes:
    """The callee's answer: [last_Via:] [last_From:] [last_To:](;tag) [last_Call-ID:]
    [last_CSeq:] [last_Record-Route:], Contact with B, SDP o= B on the 200 to the INVITE.
    SIPp's [last_Via:] gives every Via of the request in one row, comma-separated: so here."""
    rows = header_rows(request)
    out = [f"SIP/2.0 {status} {reason}".encode()]
    vias = [header_value(row) for name, row in rows if name == b"via"]
    out.append(b"Via: " + b", ".join(vias))
    for want in (b"from", b"to", b"call-id", b"cseq", b"record-route"):
        for name, row in rows:
            if name != want:
                continue
            if name == b"to" and b";tag=" not in row:
                row += f";tag={SIPP_PID}SIPpTag01{k}".encode()
            out.append(row)
    if SHAPE["shape"] == "harness":
        out.append(f"Contact: <sip:{UAS[0]}:{UAS[1]};transport=UDP>".encode())
    else:
        out.append(f"Contact: <sip:{b}@{UAS[0]}:{UAS[1]}>".encode())
    payload = sdp("uas" if SHAPE["shape"] == "harness" else b) if body else b""
    if payload:
        out.append(b"Content-Type: application/sdp")
    out.append(b"Content-Length: %d" % len(payload))
    return b"\r\n".join(out) + b"\r\n\r\n" + payload


def in_dialog(method: str, k: int, a: str, ok: bytes, cseq: int) -> bytes:
    """ACK / BYE of the caller: [next_url] (the 200's Contact), [routes] (its Record-Route,
    reversed), [last_To:]."""
    rows = header_rows(ok)
    contact = next(header_value(r) for n, r in rows if n == b"contact")
    target = _ANGLE.search(contact)
    uri = (target.group(1) if target else contact).decode()
    routes = [u for n, r in rows if n == b"record-route" for u in _ANGLE.findall(header_value(r))]
    routes.reverse()
    to = next(r for n, r in rows if n == b"to").decode()
    route = "".join(f"Route: <{u.decode()}>\r\n" for u in routes)
    return (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {UAC[0]}:{UAC[1]};branch=z9hG4bK-{SIPP_PID}-{k}-{cseq}{method}\r\n"
        f"{route}"
        f"From: <sip:{a}@{UAC[0]}>;tag={SIPP_PID}SIPpTag00{k}\r\n"
        f"{to}\r\n"
        f"Call-ID: {k}-{SIPP_PID}@{UAC[0]}\r\n"
        f"CSeq: {cseq} {method}\r\n"
        f"Contact: <sip:{'uac' if SHAPE['shape'] == 'harness' else a}@{UAC[0]}:{UAC[1]}>\r\n"
        f"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _first_line(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0].decode("latin-1")


def _user_of(data: bytes, name: bytes) -> bytes | None:
    for n, row in header_rows(data):
        if n == name:
            m = _URI_USER.search(header_value(row))
            return m.group(1) if m else None
    return None


# ---- the run ----------------------------------------------------------------------------------

@dataclass
class Round:
    calls: int
    calls_cpu: float = 0.0  # seconds in receive_datagram + the lookup step
    timers_cpu: float = 0.0  # seconds in the ticks (next_deadline, handle_timers)
    gc_cpu: float = 0.0  # seconds in the worker's young collections (YoungCollector's cadence)
    gc_runs: int = 0
    messages_in: int = 0
    messages_out: int = 0
    evictions: int = 0  # datagrams delivered after the caches were evicted (--evict-kb)
    timer_runs: int = 0  # ticks at which a deadline was due: handle_timers calls
    timer_sends: int = 0  # datagrams the timers sent (retransmissions, 408s): 0 when healthy
    transactions_left: int = 0

    @property
    def calls_us(self) -> float:
        return self.calls_cpu / self.calls * 1e6

    @property
    def timers_us(self) -> float:
        return self.timers_cpu / self.calls * 1e6

    @property
    def gc_us(self) -> float:
        return self.gc_cpu / self.calls * 1e6

    @property
    def total_us(self) -> float:
        return self.calls_us + self.timers_us + self.gc_us


@dataclass
class Result:
    rounds: list[Round] = field(default_factory=list)  # measured rounds (not the warm-up)
    transactions_left: int = 0  # after every round's 40 s drain, warm-up included
    privacy_checked_calls: int = 0
    privacy_checked_messages: int = 0
    calls_made: int = 0  # warm-up included
    stats: dict[str, int] = field(default_factory=dict)  # the core's counters at the end


# what the core keeps per transaction: the transaction tables, the timer wheel and the light
# tables of stateless forwards and 2xx-answered INVITEs (where the core has them)
CORE_STATE = ("server_txs", "client_txs", "wheel", "_stateless", "_accepted")


def transactions_left(core: Any) -> int:
    """Entries of the core's per-transaction state; and one more if a timer is still armed."""
    left = sum(len(getattr(core, name, ())) for name in CORE_STATE)
    return left or int(core.next_deadline() is not None)


class Bench:
    """The shell's part, on a simulated clock: deliver, resolve lookups, tick."""

    def __init__(self, core: Any, store: MemoryStore, n: int, args: argparse.Namespace,
                 result: Result) -> None:
        self.core, self.store, self.n, self.result = core, store, n, result
        self.cps, self.hold = args.cps, args.hold_ms / 1000
        self.check_every = args.check_every
        self.base = 1000.0  # the core's clock is time.monotonic(): any origin
        self.now = self.base
        self.ticks = 1
        self.young = YoungCollector()  # the worker's own cadence, on the simulated clock
        self.young(self.base)
        self.next_call = 0
        self.prof: cProfile.Profile | None = None
        self.r = Round(0)
        # --evict-kb: a line's worth of bytes written for every 64 bytes of the buffer
        self.evict_buffer = bytearray(args.evict_kb * 1024)
        self.evict_lines = b"\x01" * (len(self.evict_buffer) // 64)

    # -- the core's entry points, timed ---------------------------------------------------------
    def deliver(self, data: bytes, source: tuple[str, int]) -> list[Any]:
        core, prof, now = self.core, self.prof, self.now
        clock = time.process_time
        if self.evict_lines:  # untimed: what the other processes on this CPU did meanwhile
            self.evict_buffer[::64] = self.evict_lines
            self.r.evictions += 1
        if prof is not None:
            prof.enable()
        t0 = clock()
        core.receive_datagram(data, source, "udp", now)
        if core.lookups:  # proxy/transport.py flush
            lookups, core.lookups = core.lookups, []
            wall = time.time()
            resolve = self.store.resolve_cached
            for relay, x, caller in lookups:
                core.complete_lookup(relay, resolve(x, caller, wall), now)
        if core.to_seal:  # the shell's flush, once the sends are out
            core.after_send()
        self.r.calls_cpu += clock() - t0
        if prof is not None:
            prof.disable()
        out, core.outbox = core.outbox, []
        self.r.messages_in += 1
        self.r.messages_out += len(out)
        return out

    def advance(self, t: float, idle_ticks: bool = True) -> None:
        """The shell's 10 ms ticks up to simulated time t, then the clock at t.

        Without `idle_ticks` (the drain after a round) only the ticks at which a deadline is
        due run: the idle ones in between are the bench's artefact, not the calls' cost.
        """
        core, prof = self.core, self.prof
        clock = time.process_time
        while True:
            if not idle_ticks:
                deadline = core.next_deadline()
                if deadline is None:
                    break
                self.ticks = max(self.ticks, math.ceil((deadline - self.base) / TICK_S))
            tick = self.base + self.ticks * TICK_S
            if tick > t:
                break
            self.ticks += 1
            self.now = tick
            if prof is not None:
                prof.enable()
            t0 = clock()
            deadline = core.next_deadline()
            due = deadline is not None and deadline <= tick
            if due:
                core.handle_timers(tick)
            self.r.timers_cpu += clock() - t0
            self.r.timer_runs += due
            if prof is not None:
                prof.disable()
            if core.outbox:
                self.r.timer_sends += len(core.outbox)
                core.outbox = []
            self.collect(tick)
        self.now = t

    def collect(self, tick: float) -> None:
        """The worker's young collector (proxy.worker.YoungCollector) at this tick of the
        simulated clock, timed when it made a pass: what a call leaves alive for longer than
        its period is walked, as in a worker."""
        passes = self.young.count
        t0 = time.process_time()
        self.young(tick)
        if self.young.count != passes:
            self.r.gc_cpu += time.process_time() - t0
            self.r.gc_runs += 1

    # -- one round ------------------------------------------------------------------------------
    def run_round(self, calls: int) -> Round:
        self.r = r = Round(calls)
        first = self.next_call
        self.next_call += calls
        start = self.now
        heap: list[tuple[float, int, Iterator[float]]] = []
        seq = 0
        k = first
        while True:
            if k < first + calls and (not heap or start + (k - first) / self.cps <= heap[0][0]):
                t, flow = start + (k - first) / self.cps, self.call(k, (k - first) == 0)
                k += 1
            elif heap:
                t, _, flow = heapq.heappop(heap)
            else:
                break
            self.advance(t)
            delay = next(flow, None)
            if delay is not None:
                heapq.heappush(heap, (t + delay, seq, flow))
                seq += 1
        self.advance(self.now + DRAIN_S, idle_ticks=False)  # every end-of-life timer
        r.transactions_left = transactions_left(self.core)
        self.result.transactions_left += r.transactions_left
        self.result.calls_made += calls
        return r

    def call(self, k: int, first: bool) -> Iterator[float]:
        """One call of the SIPp pair; yields the delay to its next message."""
        a, x, b = numbers(k % self.n)
        check = first or (self.check_every > 0 and k % self.check_every == 0)
        if check:
            self.result.privacy_checked_calls += 1
        # the 100 Trying only when it is not held (timers.trying_after_ms 0): held, the 180
        # a millisecond later makes it moot
        expected = [(UAS, "INVITE ")]
        if self.core.settings.trying_after <= 0:
            expected.insert(0, (UAC, "SIP/2.0 100 "))
        fwd = self.step(k, "INVITE", invite(k, a, x), UAC, expected, check, a, b)[-1]
        if check:
            self.check_invite(k, fwd, a, x, b)
        yield UAS_DELAY_S
        self.step(k, "180", uas_reply(fwd, 180, "Ringing", k, b, False), UAS,
                  [(UAC, "SIP/2.0 180 ")], check, a, b)
        yield UAS_DELAY_S
        ok = self.step(k, "200", uas_reply(fwd, 200, "OK", k, b, True), UAS,
                       [(UAC, "SIP/2.0 200 ")], check, a, b)[0]
        if check:
            self.check_ok(k, ok, a, x)
        yield UAS_DELAY_S
        self.step(k, "ACK", in_dialog("ACK", k, a, ok, 1), UAC, [(UAS, "ACK ")], check, a, b)
        yield self.hold
        fwd_bye = self.step(k, "BYE", in_dialog("BYE", k, a, ok, 2), UAC, [(UAS, "BYE ")],
                            check, a, b)[0]
        yield UAS_DELAY_S
        self.step(k, "200 to BYE", uas_reply(fwd_bye, 200, "OK", k, b, False), UAS,
                  [(UAC, "SIP/2.0 200 ")], check, a, b)

    def step(self, k: int, what: str, data: bytes, source: tuple[str, int],
             expected: list[tuple[tuple[str, int], str]], check: bool, a: str,
             b: str) -> list[bytes]:
        """Deliver one message; the datagrams out must be `expected` (destination, start)."""
        out = self.deliver(data, source)
        got = sorted((o.dest, _first_line(o.data)) for o in out)
        if len(out) != len(expected) or any(
                dest != want_dest or not line.startswith(want)
                for (dest, line), (want_dest, want) in zip(got, sorted(expected), strict=True)):
            raise BenchError(f"call {k}, {what}: expected {expected}, the core sent {got}")
        matched = []
        for want_dest, want in expected:
            matched.append(next(o.data for o in out
                                if o.dest == want_dest and _first_line(o.data).startswith(want)))
        if check:
            for o in out:
                self.result.privacy_checked_messages += 1
                hidden = a if o.dest == UAS else b
                if hidden.encode() in o.data:
                    side = "callee" if o.dest == UAS else "caller"
                    raise BenchError(f"call {k}, {what}: the {side} side received {hidden}:\n"
                                     + o.data.decode("latin-1"))
        return matched

    @staticmethod
    def check_invite(k: int, fwd: bytes, a: str, x: str, b: str) -> None:
        """What the harness's uas.xml checks on the INVITE B receives."""
        m = re.match(rb"INVITE sips?:([^@;> ]+)@", fwd)
        got = {"Request-URI": m.group(1) if m else None,
               "From": _user_of(fwd, b"from"), "To": _user_of(fwd, b"to"),
               "P-Asserted-Identity": _user_of(fwd, b"p-asserted-identity")}
        want = {"Request-URI": b.encode(), "From": x.encode(), "To": x.encode(),
                "P-Asserted-Identity": x.encode()}
        if got != want:
            raise BenchError(f"call {k}: INVITE to the callee has users {got}, expected {want}")

    @staticmethod
    def check_ok(k: int, ok: bytes, a: str, x: str) -> None:
        """What the harness's uac.xml checks on the 200: From is A's own again, To still X."""
        got = (_user_of(ok, b"from"), _user_of(ok, b"to"))
        if got != (a.encode(), x.encode()):
            raise BenchError(f"call {k}: 200 to the caller has From/To users {got}, "
                             f"expected {(a, x)}")


# ---- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("calls", nargs="?", type=int, default=5000, help="calls per round")
    p.add_argument("--bindings", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cps", type=float, default=500.0)
    p.add_argument("--hold-ms", type=float, default=100.0)
    p.add_argument("--check-every", type=int, default=50)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--records", action="store_true",
                   help="call records on (records.enabled): the tracker's hooks in the core, "
                        "and the writer's encoding of each round's Redis batch, timed apart")
    p.add_argument("--max-call-s", type=int, default=None,
                   help="policy.max_call_s: each answered call is remembered for ending it "
                        "at its limit (the limit is never reached in a round)")
    p.add_argument("--trying-after-ms", type=int, default=None,
                   help="timers.trying_after_ms (the config's 200: the UAS's 180 comes first "
                        "and no 100 is sent; 0: a 100 for every INVITE, as before 2026-12-04)")
    p.add_argument("--shape", choices=("production", "harness"), default="production",
                   help="production: A and B in Contact and SDP o= as real UAs put them; "
                        "harness: the shared harness's own rows (no number there), to compare "
                        "with ../shared/bench end to end")
    p.add_argument("--evict-kb", type=int, default=0,
                   help="before each datagram, untimed, write every 64-byte line of a buffer "
                        "of this many KiB: the cold caches of a worker that wakes for each "
                        "datagram at a low rate (8192: +50-60 %%, as a worker's user time a "
                        "call from 2,500 to 1,000 CPS on the 2-core VM; 0: warm, as under load)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--sort", default="cumulative", help="pstats order with --profile")
    p.add_argument("--cumulative", action="store_const", const="cumulative", dest="sort",
                   help=argparse.SUPPRESS)  # the old spelling
    args = p.parse_args(argv)
    if args.calls < 1 or args.rounds < 1 or args.bindings < 1 or args.cps <= 0:
        p.error("CALLS, --rounds, --bindings and --cps must be positive")
    if args.check_every < 0 or args.warmup < 0 or args.hold_ms < 0 or args.evict_kb < 0:
        p.error("--check-every, --warmup, --hold-ms and --evict-kb cannot be negative")
    return args


def report(args: argparse.Namespace, result: Result) -> None:
    rounds = sorted(result.rounds, key=lambda r: r.total_us)
    best = rounds[0]
    median = statistics.median(r.total_us for r in rounds)
    calls = sum(r.calls for r in rounds)
    msg_in = sum(r.messages_in for r in rounds) / calls
    msg_out = sum(r.messages_out for r in rounds) / calls
    timer_sends = sum(r.timer_sends for r in rounds)
    timer_runs = sum(r.timer_runs for r in rounds) / calls
    under = " (under cProfile)" if args.profile else ""
    print(f"{args.calls} calls x {len(rounds)} rounds{under}: core CPU per call best "
          f"{best.total_us:.1f} µs, median {median:.1f} µs ({msg_in:g} messages in, "
          f"{msg_out:g} out per call: parse, rewrite, transactions, serialise, call log, timers)")
    print(f"  per call, best round / median: calls phase {best.calls_us:.1f} / "
          f"{statistics.median(r.calls_us for r in rounds):.1f} µs, timers phase "
          f"{best.timers_us:.1f} / {statistics.median(r.timers_us for r in rounds):.1f} µs "
          f"({timer_runs:.2f} handle_timers runs per call, {timer_sends} datagrams sent by "
          f"timers), young collections {best.gc_us:.1f} / "
          f"{statistics.median(r.gc_us for r in rounds):.1f} µs ({best.gc_runs} in the best "
          f"round)")
    print(f"  {args.shape} rows, {args.bindings} bindings, a different caller per call"
          f"{'' if result.calls_made <= args.bindings else ' (callers repeat: calls > bindings)'}"
          f", {args.cps:g} calls/s, hold {args.hold_ms:g} ms, clock +{DRAIN_S:g} s after each "
          f"round: {result.transactions_left} transactions left; privacy checked on "
          f"{result.privacy_checked_calls} calls ({result.privacy_checked_messages} messages)")
    if args.evict_kb:
        print(f"  cold caches: {args.evict_kb} KiB written (a byte a 64-byte line, untimed) "
              f"before each of the {sum(r.evictions for r in rounds)} datagrams measured")


def encode_records(tracker: Any) -> float:
    """CPU µs to turn the tracker's ops into the writer's Redis commands (one MULTI per
    batch, as proxy/records/writer.py sends them), without a socket."""
    from redis.connection import Connection

    conn = Connection()
    ops, tracker.out = tracker.out, []
    t0 = time.process_time()
    for at in range(0, len(ops), 500):  # one batch per flush under load
        commands: list[tuple[Any, ...]] = [("MULTI",)]
        for op in ops[at:at + 500]:
            if op[0] == "record":
                args = [a for kv in op[1].items() for a in kv]
                commands.append(("XADD", "sip700:records", "MINID", "~", "0-0", "*", *args))
            elif op[0] == "open":
                args = [a for kv in op[2].items() for a in kv]
                commands.append(("HSET", f"sip700:call:{op[1]}", *args))
                commands.append(("EXPIRE", f"sip700:call:{op[1]}", 46800))
            elif op[0] == "close":
                commands.append(("DEL", f"sip700:call:{op[1]}"))
        commands.append(("SET", "sip700:records:batch:x", 1, "EX", 3600))
        commands.append(("EXEC",))
        conn.pack_commands(commands)
    return (time.process_time() - t0) * 1e6


def main(argv: list[str] | None = None) -> Result:
    """Run the bench and print its figures; BenchError if the flow or a privacy check broke,
    or a transaction outlived the drain."""
    args = parse_args(argv)
    SHAPE["shape"] = args.shape
    result = Result()
    prof = cProfile.Profile() if args.profile else None
    gc_threshold = gc.get_threshold()
    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
        cfg = load_config(write_config(Path(tmp), args.bindings, args.records,
                                       args.max_call_s, args.trying_after_ms))
        with DevNullLogging(cfg.logging.level, cfg.logging.format):
            try:
                key = dialog_key(cfg)  # the configured one: no warning
                store = open_memory_store(cfg)
                gc.set_threshold(100_000, 1000, 1000)  # as proxy.cli.serve
                core = build_core(cfg, key, 0)
                bench = Bench(core, store, args.bindings, args, result)
                if args.warmup:
                    bench.run_round(args.warmup)
                bench.prof = prof
                if core.calls is not None:
                    core.calls.out.clear()
                records_us: list[float] = []
                for _ in range(1 if prof is not None else args.rounds):
                    result.rounds.append(bench.run_round(args.calls))
                    if core.calls is not None:
                        records_us.append(encode_records(core.calls) / args.calls)
                bench.prof = None
                result.stats = dict(core.stats)
            finally:
                gc.set_threshold(*gc_threshold)
                gc.unfreeze()
    report(args, result)
    if args.records:
        print(f"  records: the writer's encoding of the batches (RESP, off the message path) "
              f"{min(records_us):.1f} / {statistics.median(records_us):.1f} µs per call "
              f"(best / median), {result.stats.get('records_made', 0)} records made")
    if prof is not None:
        pstats.Stats(prof).sort_stats(args.sort).print_stats(40)
        if os.environ.get("BENCH_CORE_CALLEES"):  # who spends the time inside a function
            pstats.Stats(prof).print_callees(os.environ["BENCH_CORE_CALLEES"])
    if result.transactions_left:
        raise BenchError(f"{result.transactions_left} transactions outlived the drain")
    if result.stats.get("internal_errors"):
        raise BenchError(f"the core counted internal errors: {result.stats}")
    return result


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        print(f"bench_core: FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
