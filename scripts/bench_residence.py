#!/usr/bin/env python3
"""How long each kind of message spends inside the proxy, read from a packet capture.

The harness's INVITE→200 time is the caller's view: the proxy's three passes (the INVITE out,
the 180 and the 200 back) plus the callee's own turn-around. This splits it: every datagram the
proxy receives is paired with the one it sends for it, and the time between the two (the
kernel's stamps on the loopback interface) is that message's residence: its wait in the socket's
queue, the proxy's work and its send. Per message kind it prints the median, p90, p99 and
maximum, in µs. It reads any proxy the same way (sip700 or Kamailio).

    tcpdump -i lo -s 0 -B 65536 -w /tmp/run.pcap 'udp and portrange 15060-15080' &
    ../shared/bench/run.sh project 1000 10; kill %1
    scripts/bench_residence.py /tmp/run.pcap

A datagram in and one out are the same message when they carry the same From tag, CSeq and
kind (a request's method, a response's status with its CSeq method): a proxy keeps those
(sip700's privacy rewrite changes the From user and the Call-ID, not the tag), so the pairing
holds with any number of workers and any order. The first copy counts: a retransmission is
counted, not timed. What has no partner is counted too: what the proxy answers itself or
absorbs (a 100 Trying is never paired: it is hop by hop), what it refuses, and what the capture
cut off at either end.

`--proxy-ports` says which ports are the proxy's (default 15060-15069: the harness's shared
port and sip700's worker ports). The capture is classic pcap (tcpdump's `-w`), Ethernet
(`-i lo`), Linux cooked (`-i any`) or raw IP; UDP over IPv4 or IPv6.
"""

from __future__ import annotations

import argparse
import re
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# classic pcap's magic numbers: microsecond or nanosecond stamps, either byte order
_MAGIC = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
          b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}
_PCAPNG = b"\x0a\x0d\x0d\x0a"
# link types: where the IP packet starts in a frame (None: read from the frame)
_ETHERNET, _RAW, _LINUX_SLL, _LINUX_SLL2, _IPV4, _IPV6 = 1, 101, 113, 276, 228, 229
_LINK_OFFSET = {_ETHERNET: 14, _RAW: 0, _LINUX_SLL: 16, _LINUX_SLL2: 20, _IPV4: 0, _IPV6: 0}
_UDP = 17

_FROM_TAG = re.compile(rb"\r\n(?:From|f)[ \t]*:[^\r\n]*?;[ \t]*tag[ \t]*=[ \t]*([^;,\s>]+)",
                       re.IGNORECASE)
_CSEQ = re.compile(rb"\r\nCSeq[ \t]*:[ \t]*(\d+)[ \t]+([A-Za-z]+)", re.IGNORECASE)


class CaptureError(Exception):
    """The file is not a capture this reads."""


@dataclass(frozen=True)
class Datagram:
    time: float  # s, the capture's stamp
    source_port: int
    dest_port: int
    payload: bytes


def datagrams(data: bytes) -> Iterator[Datagram]:
    """The UDP datagrams of a classic pcap file, in capture order (not UDP: skipped; IP
    fragments past the first: skipped, a SIP message over UDP on loopback is not fragmented)."""
    if data[:4] == _PCAPNG:
        raise CaptureError("a pcapng file: write classic pcap (tcpdump -w does; with "
                           "tshark or dumpcap, -F pcap)")
    if len(data) < 24 or data[:4] not in _MAGIC:
        raise CaptureError("not a pcap file (no pcap magic number)")
    order, unit = _MAGIC[data[:4]]
    link = struct.unpack_from(order + "I", data, 20)[0] & 0x0FFFFFFF
    if link not in _LINK_OFFSET:
        raise CaptureError(f"link type {link} is not read here (Ethernet, Linux cooked or raw "
                           "IP: capture with -i lo or -i any)")
    record = struct.Struct(order + "IIII")
    pos = 24
    while pos + record.size <= len(data):
        seconds, fraction, captured, _ = record.unpack_from(data, pos)
        pos += record.size
        frame = data[pos:pos + captured]
        pos += captured
        ip = _ip_packet(frame, link)
        if ip is None:
            continue
        parsed = _udp(ip)
        if parsed is not None:
            yield Datagram(seconds + fraction * unit, *parsed)


def _ip_packet(frame: bytes, link: int) -> bytes | None:
    offset = _LINK_OFFSET[link]
    if link == _ETHERNET:
        ethertype = int.from_bytes(frame[12:14], "big")
        if ethertype == 0x8100:  # one VLAN tag
            ethertype, offset = int.from_bytes(frame[16:18], "big"), 18
        if ethertype not in (0x0800, 0x86DD):
            return None
    return frame[offset:]


def _udp(ip: bytes) -> tuple[int, int, bytes] | None:
    if not ip:
        return None
    version = ip[0] >> 4
    if version == 4:
        if len(ip) < 20 or ip[9] != _UDP:
            return None
        if int.from_bytes(ip[6:8], "big") & 0x1FFF:  # a later fragment
            return None
        start = (ip[0] & 0x0F) * 4
    elif version == 6:
        if len(ip) < 40 or ip[6] != _UDP:  # extension headers: not on loopback SIP
            return None
        start = 40
    else:
        return None
    if len(ip) < start + 8:
        return None
    source, dest, length = struct.unpack_from(">HHH", ip, start)
    return source, dest, ip[start + 8:start + max(length, 8)]


def message_key(payload: bytes) -> tuple[str, bytes, str] | None:
    """(kind, From tag, CSeq): what a proxy keeps of a message; None for what is not SIP or
    has no From tag or CSeq. Kind: the method of a request, `status/method` of a response."""
    end = payload.find(b"\r\n")
    if end < 0:
        return None
    first = payload[:end]
    tag = _FROM_TAG.search(payload)
    cseq = _CSEQ.search(payload)
    if tag is None or cseq is None:
        return None
    method = cseq.group(2).decode("ascii").upper()
    if first.startswith(b"SIP/2.0 "):
        status = first[8:11]
        if not status.isdigit():
            return None
        kind = f"{status.decode()}/{method}"
    else:
        space = first.find(b" ")
        if space <= 0:
            return None
        kind = first[:space].decode("ascii", "replace")
    return kind, tag.group(1), cseq.group(1).decode("ascii")


@dataclass
class Kind:
    """One message kind's residences (µs) and what could not be paired."""

    residences: list[float] = field(default_factory=list)
    unanswered: int = 0  # received, nothing sent for it
    unprompted: int = 0  # sent, nothing received for it (a message the proxy made)
    repeats: int = 0  # copies after the first (retransmissions), either way


def residences(packets: Iterator[Datagram], proxy_ports: set[int]) -> dict[str, Kind]:
    """Per kind, the time between each message's first arrival at a proxy port and its first
    departure from one."""
    arrived: dict[tuple[str, bytes, str], float] = {}
    left: dict[tuple[str, bytes, str], float] = {}
    kinds: dict[str, Kind] = {}
    for packet in packets:
        inbound = packet.dest_port in proxy_ports
        outbound = packet.source_port in proxy_ports
        if inbound == outbound:  # neither end is the proxy (or it talks to itself)
            continue
        key = message_key(packet.payload)
        if key is None:
            continue
        seen = arrived if inbound else left
        if key in seen:
            kinds.setdefault(key[0], Kind()).repeats += 1
            continue
        seen[key] = packet.time
    for key, t_in in arrived.items():
        kind = kinds.setdefault(key[0], Kind())
        # a 100 is hop by hop: the one a proxy sends is its own, never the one it received
        t_out = None if key[0].startswith("100/") else left.pop(key, None)
        if t_out is None or t_out < t_in:
            kind.unanswered += 1
            if t_out is not None:  # sent before it came: the proxy's own, not this one's
                kind.unprompted += 1
            continue
        kind.residences.append((t_out - t_in) * 1e6)
    for key in left:
        kinds.setdefault(key[0], Kind()).unprompted += 1
    return kinds


def percentile(ordered: list[float], p: float) -> float:
    """The nearest-rank percentile (p in 0-100) of sorted values."""
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[min(len(ordered), int(rank)) - 1]


def report(kinds: dict[str, Kind]) -> str:
    lines = [f"{'kind':<14}{'paired':>8}{'p50 µs':>9}{'p90 µs':>9}{'p99 µs':>9}{'max µs':>9}"
             f"{'unpaired in':>13}{'unpaired out':>14}{'repeats':>9}"]
    for name in sorted(kinds, key=lambda k: (k.split("/")[-1], k)):
        kind = kinds[name]
        values = sorted(kind.residences)
        if values:
            figures = "".join(f"{percentile(values, p):>9.0f}" for p in (50, 90, 99)) + \
                f"{values[-1]:>9.0f}"
        else:
            figures = f"{'-':>9}" * 4
        lines.append(f"{name:<14}{len(values):>8}{figures}{kind.unanswered:>13}"
                     f"{kind.unprompted:>14}{kind.repeats:>9}")
    return "\n".join(lines)


def port_range(text: str) -> set[int]:
    """`15060-15069` or `5060,5080`: the ports, as a set."""
    ports: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            first, last = int(low), int(high or low)
            if not 0 < first <= last < 65536:
                raise ValueError
            ports.update(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port range: {text!r} (e.g. 15060-15069)"
                                         ) from None
    return ports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("capture", type=Path, help="a classic pcap file (tcpdump -w)")
    parser.add_argument("--proxy-ports", type=port_range, default=port_range("15060-15069"),
                        help="the proxy's ports (default 15060-15069)")
    args = parser.parse_args(argv)
    try:
        data = args.capture.read_bytes()
        kinds = residences(datagrams(data), args.proxy_ports)
    except (OSError, CaptureError) as exc:
        print(f"bench_residence: {args.capture}: {exc}", file=sys.stderr)
        return 2
    if not kinds:
        print(f"bench_residence: {args.capture}: no SIP message to or from ports "
              f"{min(args.proxy_ports)}-{max(args.proxy_ports)}", file=sys.stderr)
        return 1
    print(report(kinds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
