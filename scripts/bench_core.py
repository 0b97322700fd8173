#!/usr/bin/env python3
"""Per-call CPU cost of the proxy core, without sockets (messages shuttled in memory).

One call = INVITE → 100 → (UAS) 180, 200 → ACK → BYE → 200, as the bench harness's SIPp pair
does it, through ProxyCore with a memory store. Prints µs of core CPU per call.
Usage: python3 scripts/bench_core.py [CALLS] [--profile]
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

from proxy.bindings.memory import MemoryStore
from proxy.bindings.model import make_binding
from proxy.core import CoreSettings, Hop, ProxyCore
from proxy.privacy import DialogSealer
from proxy.sip.message import build_response, parse_message

UAC = ("127.0.0.1", 15080)
PROXY = ("127.0.0.1", 15060)
UAS = ("127.0.0.1", 15070)


def invite(i: int) -> bytes:
    a, x = 13800000000 + i, 700100000000001 + i % 1000
    body = (b"v=0\r\no=uac 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\n"
            b"c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 8 0\r\n"
            b"a=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n")
    return (
        f"INVITE sip:{x}@127.0.0.1:15060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:15080;branch=z9hG4bK-{i}-1-0\r\n"
        f"From: <sip:{a}@127.0.0.1>;tag=1SIPpTag00{i}\r\n"
        f"To: <sip:{x}@127.0.0.1:15060>\r\n"
        f"Call-ID: {i}-bench@127.0.0.1\r\n"
        f"CSeq: 1 INVITE\r\n"
        f"Contact: <sip:uac@127.0.0.1:15080>\r\n"
        f"P-Asserted-Identity: <sip:{a}@127.0.0.1>\r\n"
        f"X-Bench-Id: {i}\r\n"
        f"Max-Forwards: 70\r\n"
        f"Subject: AXB bench\r\n"
        f"Content-Type: application/sdp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def uas_reply(req: bytes, status: int, reason: str, contact: bool) -> bytes:
    msg = parse_message(req)
    hdrs = [("Contact", "<sip:uas@127.0.0.1:15070>")] if contact else []
    resp = build_response(msg, status, reason, to_tag="uastag", headers=hdrs)
    rr = [row for name, row in msg.rows if name == "record-route"]
    resp.rows[1:1] = [("record-route", r) for r in rr]
    return resp.serialize()


def in_dialog(method: str, i: int, route: str, cseq: int) -> bytes:
    a, x = 13800000000 + i, 700100000000001 + i % 1000
    return (
        f"{method} sip:uas@127.0.0.1:15070 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:15080;branch=z9hG4bK-{i}-{cseq}-{method}\r\n"
        f"Route: {route}\r\n"
        f"From: <sip:{a}@127.0.0.1>;tag=1SIPpTag00{i}\r\n"
        f"To: <sip:{x}@127.0.0.1:15060>;tag=uastag\r\n"
        f"Call-ID: {i}-bench@127.0.0.1\r\n"
        f"CSeq: {cseq} {method}\r\n"
        f"Contact: <sip:uac@127.0.0.1:15080>\r\n"
        f"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 5000
    store = MemoryStore()
    now = time.time()
    for i in range(200):
        store.bind_now(make_binding("axb", str(700100000000001 + i % 1000), str(13800000000 + i),
                                    str(13900000000 + i), 3600, now), now)
    core = ProxyCore(CoreSettings("127.0.0.1", 15060, lambda ip: True,
                                  lambda n: n.startswith("700") and len(n) == 15,
                                  [Hop("127.0.0.1", 15070, "udp")]),
                     DialogSealer(b"k" * 32))
    # prepare: UAS replies need the forwarded INVITE, so run the call flow live
    clock = time.process_time

    def one_call(i: int) -> float:
        spent = 0.0
        t0 = clock()
        core.receive_datagram(invite(i), UAC, "udp", 0.0)
        for relay, x, caller in core.lookups:
            core.complete_lookup(relay, store.resolve_cached(x, caller, now), 0.0)
        core.lookups.clear()
        spent += clock() - t0
        fwd = next(o.data for o in core.outbox if o.dest == UAS)
        core.outbox.clear()
        r180 = uas_reply(fwd, 180, "Ringing", False)
        r200 = uas_reply(fwd, 200, "OK", True)
        t0 = clock()
        core.receive_datagram(r180, UAS, "udp", 0.0)
        core.receive_datagram(r200, UAS, "udp", 0.0)
        spent += clock() - t0
        ok = [o.data for o in core.outbox if o.dest == UAC][-1]
        core.outbox.clear()
        route = parse_message(ok).header_values("record-route")[0]
        ack = in_dialog("ACK", i, route, 1)
        bye = in_dialog("BYE", i, route, 2)
        t0 = clock()
        core.receive_datagram(ack, UAC, "udp", 0.0)
        core.receive_datagram(bye, UAC, "udp", 0.0)
        spent += clock() - t0
        fwd_bye = [o.data for o in core.outbox if o.dest == UAS][-1]
        core.outbox.clear()
        bye200 = uas_reply(fwd_bye, 200, "OK", False)
        t0 = clock()
        core.receive_datagram(bye200, UAS, "udp", 0.0)
        spent += clock() - t0
        core.outbox.clear()
        return spent

    for i in range(200):
        one_call(i)
    if "--profile" in sys.argv:
        for i in range(200, 200 + calls):
            store.bind_now(make_binding("axb", str(700100000000001 + i % 1000),
                                        str(13800000000 + i), str(13900000000 + i), 3600, now),
                           now)
        prof = cProfile.Profile()
        prof.enable()
        for i in range(200, 200 + calls):
            one_call(i)
        prof.disable()
        order = "cumulative" if "--cumulative" in sys.argv else "tottime"
        pstats.Stats(prof).sort_stats(order).print_stats(40)
        return
    # five rounds; the best one is the figure (others show the noise of a shared machine)
    per_call = []
    for r in range(5):
        first = 200 + r * calls
        for i in range(first, first + calls):
            store.bind_now(make_binding("axb", str(700100000000001 + i % 1000),
                                        str(13800000000 + i), str(13900000000 + i), 3600, now),
                           now)
        per_call.append(sum(one_call(i) for i in range(first, first + calls)) / calls * 1e6)
    per_call.sort()
    print(f"{calls} calls x 5 rounds: core CPU per call best {per_call[0]:.1f} µs, "
          f"median {per_call[2]:.1f} µs (7 messages in, 8 out: parse, rewrite, transactions, "
          f"serialise)")


if __name__ == "__main__":
    main()
