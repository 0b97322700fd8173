"""Flood protection per source address (policy.flood) through a running sip700.

Real processes: the proxy (`python -m proxy run`, memory and Redis stores, `workers: auto`), SIPp
on both legs from 127.0.0.1 (a trusted peer: exempt), and a raw UDP socket on 127.0.0.2 that
floods the proxy's SIP port with OPTIONS.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.sip.message import parse_message
from tests.integration.procs import ProxyProcess
from tests.integration.rawsip import build_request, uniq
from tests.integration.test_call_flows import (
    A1,
    A2,
    B1,
    B2,
    X1,
    X2,
    CallPlan,
    assert_all_succeeded,
    proxy_stats,
    run_flow,
)

pytestmark = pytest.mark.integration

FLOODER = "127.0.0.2"
LIMIT = 50
COOLDOWN_S = 5


def flood_config(action: str) -> dict:
    return {"policy": {"flood": {"enabled": True, "max_requests_per_s": LIMIT,
                                 "cooldown_s": COOLDOWN_S, "action": action}}}


def options() -> bytes:
    tag = uniq()
    return build_request("OPTIONS", "sip:127.0.0.1", [
        ("Via", f"SIP/2.0/UDP {FLOODER};branch=z9hG4bK{tag};rport"),
        ("From", f"<sip:flood@{FLOODER}>;tag={tag}"), ("To", "<sip:127.0.0.1>"),
        ("Call-ID", tag), ("CSeq", "1 OPTIONS"), ("Max-Forwards", "70")])


def answers(sock: socket.socket, wait: float = 0.5, got: Counter | None = None) -> Counter:
    """Statuses of what reached the flooding socket (and every Retry-After of the 503s), read
    until nothing came for `wait` seconds (0: only what is there now)."""
    got = Counter() if got is None else got
    if wait:
        sock.settimeout(wait)
    else:
        sock.setblocking(False)
    while True:
        try:
            data, _ = sock.recvfrom(65535)
        except (TimeoutError, BlockingIOError):
            return got
        msg = parse_message(data)
        got[msg.status] += 1
        if msg.status == 503:
            got[f"retry-after {msg.header('retry-after')}"] += 1


def test_a_flooding_source_is_cut_off_while_another_sources_calls_go_through(
        start_sip700: Callable[..., ProxyProcess], tmp_path: Path) -> None:
    proxy = start_sip700(overrides=flood_config("reply"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((FLOODER, 0))
    stop = threading.Event()
    sent = [0]
    got: Counter = Counter()

    def flood() -> None:
        while not stop.is_set():
            sock.sendto(options(), ("127.0.0.1", proxy.port))
            sent[0] += 1
            time.sleep(0.002)
            answers(sock, 0, got)  # as they come: the socket's buffer holds only so many

    flooder = threading.Thread(target=flood, daemon=True)
    began = time.monotonic()
    flooder.start()
    try:
        outcome = run_flow(proxy, tmp_path, caller="uac_basic.xml", callee="uas_basic.xml",
                           plans=[CallPlan(A1, X1, B1, 1), CallPlan(A2, X2, B2, 2)],
                           caller_extra=["-d", "100"])
        # a flood well past what the workers let through in a first second (LIMIT each), so
        # that most of it must be cut off however fast the calls above went
        deadline = time.monotonic() + 10
        while sent[0] < 4 * LIMIT and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        flooder.join()
    took = time.monotonic() - began
    answers(sock, 0.5, got)
    sock.close()
    assert_all_succeeded(outcome, 2)  # 127.0.0.1 is a trusted peer: exempt
    # what got through was answered as usual (403: 127.0.0.2 is no trusted peer), at most the
    # limit per worker in each cool-down; everything else got 503 with Retry-After
    windows = int(took // COOLDOWN_S) + 1
    assert got[403] <= 2 * LIMIT * windows, (got, sent, took)
    assert got[503] + got[403] == sent[0], (got, sent)  # every request answered, one way
    assert got[503] >= sent[0] // 2 and got[f"retry-after {COOLDOWN_S}"] == got[503], (got, sent)
    lines = [ln for ln in proxy.log_lines() if "flood_blocked" in ln]
    assert 1 <= len(lines) <= 2 * windows and all(FLOODER in ln for ln in lines), lines
    stats = proxy_stats(proxy)
    assert stats.get("flood_blocked") == got[503], stats
    assert stats.get("calls_routed") == 2, stats


def test_drop_answers_nothing_past_the_limit(start_sip700: Callable[..., ProxyProcess]
                                             ) -> None:
    proxy = start_sip700(overrides=flood_config("drop"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((FLOODER, 0))
    for _ in range(4 * LIMIT):  # one burst, well within a second
        sock.sendto(options(), ("127.0.0.1", proxy.port))
    got = answers(sock)
    sock.close()
    # the limit once, or twice when the burst straddles a second
    assert 503 not in got and LIMIT <= got[403] <= 2 * LIMIT, got
    stats = proxy_stats(proxy)
    assert stats.get("flood_blocked") == 4 * LIMIT - got[403], stats
