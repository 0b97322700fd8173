#!/usr/bin/env python3
"""Micro-benchmark of the SIP message layer on a typical 1 KB INVITE with SDP.

Prints median and p99 (µs) of:
  (a) parse
  (b) parse + read From, To, top Via, CSeq, Call-ID
  (c) parse + rewrite the From user + push a Via + serialise
Usage: python3 scripts/bench_sip.py [ROUNDS]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# this checkout's package, not whichever one is installed (a worktree measured against another)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.sip.message import parse_message

INVITE = (
    b"INVITE sip:700100000000001@10.0.0.1:5060;user=phone SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.1.2.3:5060;branch=z9hG4bK-524287-1---2f1a3b4c5d6e7f80;rport\r\n"
    b"Via: SIP/2.0/UDP 10.9.8.7:5060;received=10.9.8.7;branch=z9hG4bK776asdhds\r\n"
    b"Max-Forwards: 69\r\n"
    b"From: \"13800000001\" <sip:13800000001@10.1.2.3;user=phone>;tag=1928301774\r\n"
    b"To: <sip:700100000000001@10.0.0.1;user=phone>\r\n"
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:13800000001@10.1.2.3:5060;transport=udp>\r\n"
    b"P-Asserted-Identity: <sip:13800000001@10.1.2.3;user=phone>\r\n"
    b"Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, PRACK, UPDATE, INFO, REFER\r\n"
    b"Supported: 100rel, timer, replaces\r\n"
    b"Session-Expires: 1800;refresher=uac\r\n"
    b"User-Agent: CarrierSBC/5.1\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 302\r\n"
    b"\r\n"
    b"v=0\r\n"
    b"o=13800000001 2890844526 2890844526 IN IP4 10.1.2.3\r\n"
    b"s=-\r\n"
    b"c=IN IP4 10.1.2.3\r\n"
    b"t=0 0\r\n"
    b"m=audio 49170 RTP/AVP 8 0 18 101\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:18 G729/8000\r\n"
    b"a=fmtp:18 annexb=no\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-15\r\n"
    b"a=ptime:20\r\n"
    b"a=sendrecv\r\n"
    b"a=maxptime:40\r\n"
    b"a=silenceSupp:off - - - -\r\n"
    b"a=x-carrier-extension:abcdefghijkl\r\n"
)


def case_parse() -> None:
    parse_message(INVITE)


def case_read() -> None:
    m = parse_message(INVITE)
    m.from_  # noqa: B018
    m.to  # noqa: B018
    m.top_via  # noqa: B018
    m.cseq  # noqa: B018
    m.call_id  # noqa: B018


def case_rewrite() -> None:
    m = parse_message(INVITE)
    f = m.from_
    m.set_header("from", str(f.replace(uri=f.uri.with_user("700100000000001"), display=None)))
    m.push_via("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-sip700-0123456789abcdef")
    m.serialize()


def measure(fn, rounds: int) -> tuple[float, float]:
    samples = []
    batch = 50
    for _ in range(rounds // batch):
        t0 = time.perf_counter_ns()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter_ns() - t0) / batch / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rounds", nargs="?", type=int, default=200_000,
                   help="timed rounds of each case (200000)")
    rounds = p.parse_args().rounds
    if rounds < 1:
        p.error("ROUNDS must be positive")
    print(f"INVITE size: {len(INVITE)} bytes, {INVITE.count(b': ')} header rows; "
          f"{rounds} rounds, timed in batches of 50")
    for label, fn in (("(a) parse", case_parse),
                      ("(b) parse + read From/To/Via/CSeq/Call-ID", case_read),
                      ("(c) parse + rewrite From user + push Via + serialize", case_rewrite)):
        for _ in range(2000):
            fn()
        med, p99 = measure(fn, rounds)
        print(f"{label:55s} median {med:6.2f} µs   p99 {p99:6.2f} µs")


if __name__ == "__main__":
    main()
