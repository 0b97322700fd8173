"""Spreading one trunk's datagrams over the workers by Call-ID, in the kernel.

With several workers, each binds the shared UDP port with SO_REUSEPORT, and the kernel picks
one socket per datagram by a hash of the source and destination addresses: every datagram of
one trunk (one source address and port) then reaches one worker. Left at that, either one
worker carries the whole trunk, or it passes half of its datagrams to the other workers, which
costs both of them (the relay in transport.py).

The classic BPF program built here (SO_ATTACH_REUSEPORT_CBPF, no privilege needed) makes the
kernel pick the socket by the Call-ID instead: every request of a call that the caller sends
(the INVITE, its retransmissions, CANCEL, ACK, BYE) has the same Call-ID, so it reaches the same
worker, which owns the call; different calls spread evenly. Nothing here decides what a message
may do: the worker that receives a request still checks everything, and an in-dialog request
that names another worker's port in its Route is passed there (transport.py).

How the program reads a datagram (the UDP payload, from its first byte): it looks for
"\\nCal" at every offset below SCAN_BYTES (classic BPF has no loops: the scan is unrolled,
4 instructions an offset), checks that the row is `Call-ID: ` (any case for "l-ID", one space),
and hashes the 8 bytes after it with keys derived from the instance's random secret. What it
cannot read that way (compact form `i:`, no space, a Call-ID row past SCAN_BYTES) falls back
to the kernel's own choice by addresses (consistent for a source); a datagram shorter than the
place it reads goes to socket 0 (classic BPF ends the program with 0 on a load past the end).
A Call-ID shorter than 8 bytes hashes the bytes after it too: still one socket per datagram
layout, not per call.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import socket
import struct

SO_ATTACH_REUSEPORT_CBPF = 51
SCAN_BYTES = 900  # offsets scanned for the Call-ID row: 4 instructions each
MIN_SCAN_BYTES = 100  # below that, not worth it: the kernel's choice by addresses
FALLBACK = 0xFFFFFFFF  # an index past the last socket: the kernel chooses by addresses

_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
# classic BPF opcodes (linux/filter.h)
_LD_W_ABS = 0x20
_LD_W_IND = 0x40
_LD_H_IND = 0x48
_LDX_IMM = 0x01
_LDX_MEM = 0x61
_ST = 0x02
_JA = 0x05
_JEQ_K = 0x15
_OR_K = 0x44
_XOR_K = 0xA4
_MUL_K = 0x24
_ADD_X = 0x0C
_RSH_K = 0x74
_MOD_K = 0x94
_RET_A = 0x16
_RET_K = 0x06

_ROW_START = 0x0A43616C  # "\nCal"
_ROW_REST = 0x6C2D6964  # "l-id", after OR 0x20202020 ("l-ID", "l-Id", "L-ID" ...)
_COLON_SPACE = 0x3A20  # ": "
_VALUE_AT = 10  # len("\nCall-ID: ")
_MASK32 = 0xFFFFFFFF


def keys_from(secret: bytes) -> tuple[int, int, int, int]:
    """The program's keys (odd multipliers) from the workers' shared secret: every worker of an
    instance attaches the same program, so a restarted one changes nothing, and nobody outside
    can choose Call-IDs that all land on one worker."""
    k = struct.unpack("4I", hashlib.blake2b(secret, person=b"sip700 spread", digest_size=16)
                      .digest())
    return k[0], k[1] | 1, k[2], k[3] | 1


def _mix(w1: int, w2: int, keys: tuple[int, int, int, int], sockets: int) -> int:
    """The program's hash, in Python (the tests check the kernel against it)."""
    k1, k2, k3, k4 = keys
    a = ((w1 ^ k1) * k2) & _MASK32
    b = ((w2 ^ k3) * k4) & _MASK32
    return (((a + b) & _MASK32) >> 16) % sockets


def program(sockets: int, keys: tuple[int, int, int, int], scan: int = SCAN_BYTES) -> bytes:
    """The classic BPF program: the index of the socket (0 … sockets-1) for a datagram."""
    if not 1 < sockets < 0x10000:
        raise ValueError(f"sockets: {sockets}")
    k1, k2, k3, k4 = keys
    insns: list[tuple[int, int, int, int]] = []
    common = 4 * scan + 1
    for offset in range(scan):
        at = len(insns)
        insns += [(_LD_W_ABS, 0, 0, offset),
                  (_JEQ_K, 0, 2, _ROW_START),
                  (_LDX_IMM, 0, 0, offset),
                  (_JA, 0, 0, common - (at + 4))]
    insns.append((_RET_K, 0, 0, FALLBACK))  # no Call-ID row in the scanned bytes
    assert len(insns) == common
    tail = [
        (_LD_W_IND, 0, 0, 4), (_OR_K, 0, 0, 0x20202020), (_JEQ_K, 0, 0, _ROW_REST),  # jf: fail
        (_LD_H_IND, 0, 0, 8), (_JEQ_K, 0, 0, _COLON_SPACE),  # jf: fail
        (_LD_W_IND, 0, 0, _VALUE_AT), (_XOR_K, 0, 0, k1), (_MUL_K, 0, 0, k2), (_ST, 0, 0, 0),
        (_LD_W_IND, 0, 0, _VALUE_AT + 4), (_XOR_K, 0, 0, k3), (_MUL_K, 0, 0, k4),
        (_LDX_MEM, 0, 0, 0), (_ADD_X, 0, 0, 0), (_RSH_K, 0, 0, 16), (_MOD_K, 0, 0, sockets),
        (_RET_A, 0, 0, 0),
        (_RET_K, 0, 0, FALLBACK),  # not a `Call-ID: ` row
    ]
    fail = len(tail) - 1
    for i in (2, 4):  # the two checks jump to the last instruction when they fail
        code, jt, _, k = tail[i]
        tail[i] = (code, jt, fail - i - 1, k)
    insns += tail
    return b"".join(_INSN.pack(*insn) for insn in insns)


def single_program(index: int) -> bytes:
    """A classic BPF program that gives every datagram to socket `index` of the group (one
    worker takes every new call while the load is low: proxy/steering.py)."""
    if not 0 <= index < 0x10000:
        raise ValueError(f"index: {index}")
    return _INSN.pack(_RET_K, 0, 0, index)


def expected_socket(data: bytes, sockets: int, keys: tuple[int, int, int, int],
                    scan: int = SCAN_BYTES) -> int | None:
    """Which socket the program picks for `data`; None: the kernel's own choice."""
    at = data.find(b"\nCal", 0, scan + 3)
    if at < 0:
        return None if len(data) >= scan + 3 else 0
    if at + 8 > len(data):
        return 0  # a load past the end ends the program with 0
    if int.from_bytes(data[at + 4:at + 8], "big") | 0x20202020 != _ROW_REST:
        return None
    if at + 10 > len(data):
        return 0
    if data[at + 8:at + 10] != b": ":
        return None
    end = at + _VALUE_AT + 8
    if end > len(data):
        return 0
    w1 = int.from_bytes(data[at + _VALUE_AT:at + _VALUE_AT + 4], "big")
    w2 = int.from_bytes(data[at + _VALUE_AT + 4:end], "big")
    return _mix(w1, w2, keys, sockets)


def _attach_code(sock: socket.socket, code: bytes) -> None:
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(code) // _INSN.size, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def attach_single(sock: socket.socket, index: int) -> None:
    """Attach single_program(index) to the reuseport group of `sock`."""
    _attach_code(sock, single_program(index))


def attach(sock: socket.socket, sockets: int, keys: tuple[int, int, int, int]) -> int:
    """Attach the program to the reuseport group of `sock` (every socket bound to the same
    address with SO_REUSEPORT; the last program attached is the group's). Returns the bytes it
    scans: a kernel that refuses the program's size (ENOMEM: net.core.optmem_max) gets a shorter
    scan. OSError where the kernel has no SO_ATTACH_REUSEPORT_CBPF."""
    scan = SCAN_BYTES
    while True:
        try:
            _attach_code(sock, program(sockets, keys, scan))
            return scan
        except OSError as exc:
            if exc.errno != errno.ENOMEM or scan <= MIN_SCAN_BYTES:
                raise
            scan //= 2
