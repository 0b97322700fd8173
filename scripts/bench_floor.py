#!/usr/bin/env python3
"""The floor: a deliberately minimal stateless AXB forwarder, for the shared harness only.

What does Python itself cost a call on this machine, with nothing of a product around it? This
forwarder does exactly what `../shared/bench` checks and nothing else: the binding lookup in a
dict, the Request-URI, From and P-Asserted-Identity rewrite towards the callee, the From
restored towards the caller, a sealed token (AES-GCM, as sip700's) in its Record-Route and Via
branch so that in-dialog requests and responses need no state. One process, uvloop, one UDP
socket, `bytes.find` parsing of the long header names SIPp sends.

What it leaves out is what makes sip700 a proxy an operator can run: transactions
(retransmissions absorbed, CANCEL, Timer C, 100 Trying), validation of what arrives, Contact
and SDP privacy, compact header forms, TCP, several workers, the overload guard, logs, metrics,
call records, policy. So its CPU a call is a floor, not a target: the gap between it and
sip700 at one rate is what those cost at that rate.

    PROJECT_CMD="python3 $PWD/scripts/bench_floor.py" ../shared/bench/run.sh project 1000 30

The harness calls it as it calls sip700 (`run --config FILE`); it reads `listen`, `carrier`
and `store.bindings_file` (memory store only) from that file.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

import yaml
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SO_RCVBUFFORCE = 33  # Linux; the socket module does not name it
_BINDING_ROW = re.compile(rb'x: "(\d+)", a: "(\d+)", b: "(\d+)"')
_USER = re.compile(rb"sips?:([^@;>]+)@")


def load_bindings(path: Path) -> dict[tuple[bytes, bytes], bytes]:
    """(X, A) -> B and (X, B) -> A from the harness's bindings file (one flow row per binding)."""
    table: dict[tuple[bytes, bytes], bytes] = {}
    for x, a, b in _BINDING_ROW.findall(path.read_bytes()):
        table[(x, a)] = b
        table[(x, b)] = a
    return table


class Floor:
    """The sans-IO part: one datagram in, (datagram, address) out or None."""

    def __init__(self, bindings: dict[tuple[bytes, bytes], bytes], me: tuple[str, int],
                 carrier: tuple[str, int], key: bytes) -> None:
        self.bindings = bindings
        self.host = f"{me[0]}:{me[1]}".encode()
        self.ip = me[0].encode()
        self.carrier = carrier
        self.carrier_host = f"{carrier[0]}:{carrier[1]}".encode()
        self.aead = AESGCM(key)

    # -- the token: "A X" sealed; the nonce is derived from what it seals and the Call-ID, so
    # a retransmitted INVITE gets the same branch (no nonce reuse across plaintexts) --------
    def seal(self, a: bytes, x: bytes, call_id: bytes) -> bytes:
        plain = a + b" " + x
        nonce = hashlib.blake2b(plain + call_id, digest_size=12).digest()
        return base64.urlsafe_b64encode(nonce + self.aead.encrypt(nonce, plain, None)).rstrip(b"=")

    def open(self, token: bytes) -> tuple[bytes, bytes] | None:
        try:
            raw = base64.urlsafe_b64decode(token + b"=" * (-len(token) % 4))
            a, _, x = self.aead.decrypt(raw[:12], raw[12:], None).partition(b" ")
        except (InvalidTag, ValueError):
            return None
        return a, x

    def handle(self, data: bytes, source: tuple[str, int]) -> tuple[bytes, tuple[str, int]] | None:
        """What to send for `data`, or None: dropped (malformed, not ours, a forged token)."""
        try:
            return self._handle(data, source)
        except (ValueError, IndexError):
            return None

    def _handle(self, data: bytes, source: tuple[str, int]) -> tuple[bytes, tuple[str, int]] | None:
        if data.startswith(b"SIP/2.0 "):
            return self.response(data)
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            return None
        if head.startswith(b"INVITE ") and b";tag=" not in header(head, b"To"):
            return self.initial_invite(head, body, source)
        return self.in_dialog(head, body)

    def initial_invite(self, head: bytes, body: bytes, source: tuple[str, int]
                       ) -> tuple[bytes, tuple[str, int]] | None:
        ruri = head[7:head.find(b" ", 7)]
        x_match = _USER.match(ruri)
        from_value = header(head, b"From")
        a_match = _USER.search(from_value)
        if x_match is None or a_match is None:
            return None
        x, a = x_match.group(1), a_match.group(1)
        b = self.bindings.get((x, a))
        if b is None:
            return self.reply_404(head), source
        token = self.seal(a, x, header(head, b"Call-ID"))
        tag = from_value[from_value.find(b";tag="):] if b";tag=" in from_value else b""
        lines = head.split(b"\r\n")
        out = [b"INVITE sip:" + b + b"@" + self.carrier_host + b" SIP/2.0",
               b"Via: SIP/2.0/UDP " + self.host + b";branch=z9hG4bK" + token,
               b"Record-Route: <sip:" + self.host + b";lr;t=" + token + b">"]
        for line in lines[1:]:
            if line.startswith(b"From:"):
                line = b"From: <sip:" + x + b"@" + self.ip + b">" + tag
            elif line.startswith(b"P-Asserted-Identity:"):
                line = b"P-Asserted-Identity: <sip:" + x + b"@" + self.ip + b">"
            out.append(line)
        return b"\r\n".join(out) + b"\r\n\r\n" + body, self.carrier

    def in_dialog(self, head: bytes, body: bytes) -> tuple[bytes, tuple[str, int]] | None:
        lines = head.split(b"\r\n")
        start = lines[0]
        token = b""
        out = [b""]
        for line in lines[1:]:
            if line.startswith(b"Route:") and self.host in line:
                at = line.find(b";t=")
                token = line[at + 3:line.find(b">", at)]
                continue  # our own Route: popped
            out.append(line)
        parties = self.open(token) if token else None
        if parties is None:
            return None
        a, x = parties
        for i, line in enumerate(out):
            if line.startswith(b"From:") and b"sip:" + a + b"@" in line:
                out[i] = line.replace(b"sip:" + a + b"@", b"sip:" + x + b"@", 1)
        target = start.split(b" ", 2)[1]
        out[0] = start
        out.insert(1, b"Via: SIP/2.0/UDP " + self.host + b";branch=z9hG4bK" + token)
        hostport = target.split(b":", 1)[1].rpartition(b"@")[2].split(b";")[0].split(b">")[0]
        host, _, port = hostport.partition(b":")
        to = (host.decode(), int(port or b"5060"))
        if to != self.carrier:  # the caller's in-dialog requests go to the carrier, nowhere else
            return None
        return b"\r\n".join(out) + b"\r\n\r\n" + body, to

    def response(self, data: bytes) -> tuple[bytes, tuple[str, int]] | None:
        first = data.find(b"\r\nVia:")
        end = data.find(b"\r\n", first + 2)
        if first < 0 or end < 0:
            return None
        values = data[first + 6:end].strip()  # SIPp folds all Vias into one row, comma-separated
        comma = values.find(b",")
        ours = values if comma < 0 else values[:comma]
        at = ours.find(b"branch=z9hG4bK")
        parties = self.open(ours[at + 14:].split(b";")[0]) if at >= 0 else None
        if parties is None:
            return None
        a, x = parties
        if comma < 0:  # our Via popped: a row of its own
            data = data[:first] + data[end:]
            following = header(data, b"Via")
        else:  # or the first value of the row
            following = values[comma + 1:].strip()
            data = data[:first + 2] + b"Via: " + following + data[end:]
        sent_by = following.split(b" ", 1)[1].split(b";")[0].split(b",")[0].strip()
        host, _, port = sent_by.partition(b":")
        if not host.startswith(b"127."):  # a harness tool: it answers nothing off loopback
            return None
        f = data.find(b"\r\nFrom:")
        fe = data.find(b"\r\n", f + 2)
        from_line = data[f:fe].replace(b"sip:" + x + b"@", b"sip:" + a + b"@", 1)
        return data[:f] + from_line + data[fe:], (host.decode(), int(port or b"5060"))

    def reply_404(self, head: bytes) -> bytes:
        keep = [line for line in head.split(b"\r\n")[1:]
                if line.startswith((b"Via:", b"From:", b"To:", b"Call-ID:", b"CSeq:"))]
        keep = [line + b";tag=floor404" if line.startswith(b"To:") else line for line in keep]
        return b"SIP/2.0 404 Not Found\r\n" + b"\r\n".join(keep) + b"\r\nContent-Length: 0\r\n\r\n"


def header(head: bytes, name: bytes) -> bytes:
    """The value of the first header row `name` (long form only), or b''."""
    at = head.find(b"\r\n" + name + b":")
    if at < 0:
        return b""
    start = at + len(name) + 3
    end = head.find(b"\r\n", start)
    return head[start:end if end >= 0 else len(head)].strip()


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        out = self.floor.handle(data, addr)
        if out is not None:
            self.transport.sendto(out[0], out[1])


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(config: dict[str, Any]) -> None:
    listen = _address(config["listen"][0].split(":", 1)[1])
    carrier = _address(config["carrier"]["gateways"][0].removeprefix("sip:"))
    bindings = load_bindings(Path(config["store"]["bindings_file"]))
    floor = Floor(bindings, listen, carrier, os.urandom(32))
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(floor),
                                                       local_addr=listen)
    sock = transport.get_extra_info("socket")
    try:  # sip700's transport.udp_rcvbuf_bytes: a burst waits instead of being dropped
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
    except OSError:  # without CAP_NET_ADMIN: up to net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    print(f"bench_floor: {len(bindings) // 2} bindings, listening on {listen}", flush=True)
    await asyncio.Event().wait()


USAGE = "usage: bench_floor.py run --config FILE (the harness's project config)"


def main(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"]):
        print(USAGE)
        print(__doc__.strip())
        return 0
    if len(argv) != 3 or argv[0] != "run" or argv[1] != "--config":
        print(USAGE, file=sys.stderr)
        return 2
    config = yaml.safe_load(Path(argv[2]).read_text())
    if config.get("store", {}).get("backend") != "memory":
        print("bench_floor: the memory store only (PROJECT_STORE=memory)", file=sys.stderr)
        return 2
    import uvloop

    uvloop.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
