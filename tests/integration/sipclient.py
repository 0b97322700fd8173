"""A minimal SIP caller and callee on real UDP sockets, for tests that need many short calls
under changing conditions (Redis killed, bindings removed) and must look at each answer.
"""

from __future__ import annotations

import itertools
import select
import socket
import time
from dataclasses import dataclass, field

from proxy.sip.message import SipMessage, build_response, parse_message

_seq = itertools.count(1)


@dataclass
class CallResult:
    status: int
    seconds: float
    callee_saw: list[SipMessage] = field(default_factory=list)
    responses: list[SipMessage] = field(default_factory=list)


class Endpoint:
    """A UDP socket on 127.0.0.1 that sends and receives SIP messages."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def invite(caller_port: int, proxy_port: int, x: str, a: str) -> tuple[bytes, str]:
    n = next(_seq)
    call_id = f"t{n}-{time.monotonic_ns()}@test"
    data = (
        f"INVITE sip:{x}@127.0.0.1:{proxy_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{caller_port};branch=z9hG4bKtest{n}x{time.monotonic_ns()}\r\n"
        f"From: <sip:{a}@127.0.0.1>;tag=c{n}\r\n"
        f"To: <sip:{x}@127.0.0.1:{proxy_port}>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:caller@127.0.0.1:{caller_port}>\r\n"
        f"P-Asserted-Identity: <sip:{a}@127.0.0.1>\r\n"
        f"X-Test-Id: {call_id}\r\n"
        f"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    return data, call_id


def place_call(
    proxy_port: int, caller: Endpoint, callee: Endpoint, x: str, a: str, timeout: float = 5.0
) -> CallResult:
    """Send an INVITE through the proxy; the callee answers 200 to whatever reaches it.

    Returns the caller's final status (0 on time-out), how long it took, and what the callee saw.
    """
    data, call_id = invite(caller.port, proxy_port, x, a)
    started = time.monotonic()
    caller.sock.sendto(data, ("127.0.0.1", proxy_port))
    result = CallResult(0, 0.0)
    deadline = started + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([caller.sock, callee.sock], [], [], deadline - time.monotonic())
        for sock in ready:
            packet, addr = sock.recvfrom(65535)
            msg = parse_message(packet)
            # the callee sees its own Call-ID (the proxy transforms it): match by our header
            mine = msg.header("x-test-id") == call_id if sock is callee.sock else (
                msg.call_id == call_id)
            if not mine:
                continue  # a late answer to an earlier call
            if sock is callee.sock:
                if msg.is_request and msg.method == "INVITE":
                    result.callee_saw.append(msg)
                    contact = f"<sip:callee@127.0.0.1:{callee.port}>"
                    ok = build_response(msg, 200, "OK", to_tag="callee",
                                        headers=[("Contact", contact)])
                    rr = [row for name, row in msg.rows if name == "record-route"]
                    ok.rows[1:1] = [("record-route", row) for row in rr]
                    callee.sock.sendto(ok.serialize(), addr)
                continue
            result.responses.append(msg)
            if msg.status >= 200:
                result.status = msg.status
                result.seconds = time.monotonic() - started
                return result
    result.seconds = time.monotonic() - started
    return result
