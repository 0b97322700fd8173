"""scripts/bench_residence.py: pairing what a proxy receives with what it sends, from a capture
written here byte by byte (classic pcap, the frames tcpdump writes on loopback)."""

from __future__ import annotations

import struct

import pytest

from tests.scripts import load_script

PROXY, CALLER, CALLEE, WORKER = 15060, 15080, 15070, 15061


@pytest.fixture(scope="module")
def res():
    yield from load_script("bench_residence")


def sip(first: str, tag: str, cseq: str, call_id: str = "c1") -> bytes:
    return (f"{first}\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK1\r\n"
            f"From: <sip:13800000000@127.0.0.1>;tag={tag}\r\nTo: <sip:700100000000001@x>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq}\r\nContent-Length: 0\r\n\r\n").encode()


def ipv4_udp(source: int, dest: int, payload: bytes, *, proto: int = 17,
             fragment: int = 0) -> bytes:
    udp = struct.pack(">HHHH", source, dest, 8 + len(payload), 0) + payload
    return struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, fragment, 64, proto, 0,
                       bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1])) + udp


def ipv6_udp(source: int, dest: int, payload: bytes) -> bytes:
    udp = struct.pack(">HHHH", source, dest, 8 + len(payload), 0) + payload
    return struct.pack(">IHBB16s16s", 6 << 28, len(udp), 17, 64, bytes(15) + b"\x01",
                       bytes(15) + b"\x01") + udp


def ethernet(ip: bytes) -> bytes:
    ethertype = 0x86DD if ip[0] >> 4 == 6 else 0x0800
    return bytes(12) + ethertype.to_bytes(2, "big") + ip


def linux_cooked(ip: bytes) -> bytes:
    return bytes(14) + (0x0800).to_bytes(2, "big") + ip


def pcap(frames: list[tuple[float, bytes]], *, link: int = 1, nano: bool = False,
         big_endian: bool = False) -> bytes:
    order = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, link)
    for t, frame in frames:
        seconds = int(t)
        fraction = round((t - seconds) * (1e9 if nano else 1e6))
        out += struct.pack(order + "IIII", seconds, fraction, len(frame), len(frame)) + frame
    return out


def call_frames(start: float) -> list[tuple[float, bytes]]:
    """One call through the proxy: the INVITE in 300 µs, its 180 and 200 in 40 and 60 µs,
    the caller's ACK in 20 µs; the callee's 100 absorbed, the proxy's own 100 upstream."""
    invite = sip("INVITE sip:700100000000001@127.0.0.1 SIP/2.0", "t1", "1 INVITE")
    trying = sip("SIP/2.0 100 Trying", "t1", "1 INVITE")
    ringing = sip("SIP/2.0 180 Ringing", "t1", "1 INVITE", call_id="sealed")
    ok = sip("SIP/2.0 200 OK", "t1", "1 INVITE", call_id="sealed")
    ack = sip("ACK sip:127.0.0.1:15070 SIP/2.0", "t1", "1 ACK")
    return [
        (start, ethernet(ipv4_udp(CALLER, PROXY, invite))),
        (start + 50e-6, ethernet(ipv4_udp(PROXY, CALLER, trying))),
        (start + 300e-6, ethernet(ipv4_udp(WORKER, CALLEE, invite))),
        (start + 400e-6, ethernet(ipv4_udp(CALLEE, WORKER, trying))),
        (start + 500e-6, ethernet(ipv4_udp(CALLEE, WORKER, ringing))),
        (start + 510e-6, ethernet(ipv4_udp(CALLEE, WORKER, ok))),
        (start + 540e-6, ethernet(ipv4_udp(PROXY, CALLER, ringing))),
        (start + 570e-6, ethernet(ipv4_udp(PROXY, CALLER, ok))),
        (start + 800e-6, ethernet(ipv4_udp(CALLER, PROXY, ack))),
        (start + 820e-6, ethernet(ipv4_udp(WORKER, CALLEE, ack))),
    ]


def read(res, data: bytes, ports: str = "15060-15069"):
    return res.residences(res.datagrams(data), res.port_range(ports))


def test_each_message_is_paired_with_what_the_proxy_sent_for_it(res) -> None:
    kinds = read(res, pcap(call_frames(1000.0)))
    assert sorted(kinds) == ["100/INVITE", "180/INVITE", "200/INVITE", "ACK", "INVITE"]
    assert kinds["INVITE"].residences == [pytest.approx(300, abs=1)]
    assert kinds["180/INVITE"].residences == [pytest.approx(40, abs=1)]
    assert kinds["200/INVITE"].residences == [pytest.approx(60, abs=1)]
    assert kinds["ACK"].residences == [pytest.approx(20, abs=1)]
    # a 100 is hop by hop: the callee's absorbed, the proxy's its own, never one pair
    trying = kinds["100/INVITE"]
    assert (trying.residences, trying.unanswered, trying.unprompted) == ([], 1, 1)


def test_calls_are_told_apart_by_from_tag_whatever_the_order(res) -> None:
    a, b = call_frames(1000.0), call_frames(1000.0001)
    b = [(t, frame.replace(b"tag=t1", b"tag=t2")) for t, frame in b]
    # the second call's messages leave the proxy before the first's: order says nothing
    frames = sorted(a + b, key=lambda f: f[0])
    kinds = read(res, pcap(frames))
    assert sorted(kinds["INVITE"].residences) == [pytest.approx(300, abs=1)] * 2
    assert kinds["INVITE"].unanswered == 0


def test_a_retransmission_is_counted_not_timed_and_the_unanswered_are_counted(res) -> None:
    invite = sip("INVITE sip:700100000000001@127.0.0.1 SIP/2.0", "t9", "1 INVITE")
    bye = sip("BYE sip:x@127.0.0.1 SIP/2.0", "t9", "2 BYE")
    frames = [
        (5.0, ethernet(ipv4_udp(CALLER, PROXY, invite))),
        (5.5, ethernet(ipv4_udp(CALLER, PROXY, invite))),  # the caller's retransmission
        (5.6, ethernet(ipv4_udp(WORKER, CALLEE, invite))),
        (6.0, ethernet(ipv4_udp(CALLER, PROXY, bye))),  # refused, say: nothing goes out
    ]
    kinds = read(res, pcap(frames))
    assert kinds["INVITE"].residences == [pytest.approx(600_000, abs=1)]  # from the first
    assert kinds["INVITE"].repeats == 1
    assert (kinds["BYE"].residences, kinds["BYE"].unanswered) == ([], 1)


@pytest.mark.parametrize("variant", ["nano", "big_endian", "cooked", "ipv6"])
def test_the_capture_formats_tcpdump_writes(res, variant) -> None:
    invite = sip("INVITE sip:700100000000001@127.0.0.1 SIP/2.0", "t1", "1 INVITE")
    make = ipv6_udp if variant == "ipv6" else ipv4_udp
    wrap = linux_cooked if variant == "cooked" else ethernet
    frames = [(7.000001, wrap(make(CALLER, PROXY, invite))),
              (7.000251, wrap(make(WORKER, CALLEE, invite)))]
    data = pcap(frames, link=113 if variant == "cooked" else 1, nano=variant == "nano",
                big_endian=variant == "big_endian")
    assert read(res, data)["INVITE"].residences == [pytest.approx(250, abs=1)]


def test_what_is_not_sip_over_udp_to_the_proxy_is_left_out(res) -> None:
    invite = sip("INVITE sip:700100000000001@127.0.0.1 SIP/2.0", "t1", "1 INVITE")
    frames = [
        (1.0, ethernet(ipv4_udp(CALLER, PROXY, invite, proto=6))),  # TCP: skipped
        (1.1, ethernet(ipv4_udp(CALLER, PROXY, invite, fragment=100))),  # a later fragment
        (1.2, ethernet(ipv4_udp(CALLER, CALLEE, invite))),  # past the proxy
        (1.3, ethernet(ipv4_udp(CALLER, PROXY, b"\r\n\r\n"))),  # a keep-alive
        (1.4, ethernet(ipv4_udp(CALLER, PROXY, b"INVITE x SIP/2.0\r\nCSeq: 1 INVITE\r\n"))),
        (1.5, bytes(12) + b"\x08\x06" + bytes(28)),  # ARP
    ]
    assert read(res, pcap(frames)) == {}


def test_the_proxy_ports_are_configurable(res) -> None:
    kinds = read(res, pcap(call_frames(3.0)), ports="15060,15061")
    assert kinds["INVITE"].residences == [pytest.approx(300, abs=1)]
    # with only the shared port the proxy's, the worker port's traffic is nobody's
    kinds = read(res, pcap(call_frames(3.0)), ports="15060")
    assert kinds["INVITE"].residences == [] and kinds["INVITE"].unanswered == 1


def test_percentiles_and_the_report(res) -> None:
    values = [float(v) for v in range(1, 101)]
    assert [res.percentile(values, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert res.percentile([7.0], 99) == 7.0
    text = res.report(read(res, pcap(call_frames(1.0))))
    rows = {line.split()[0]: line.split() for line in text.splitlines()[1:]}
    assert rows["INVITE"][:6] == ["INVITE", "1", "300", "300", "300", "300"]
    assert rows["100/INVITE"][1:] == ["0", "-", "-", "-", "-", "1", "1", "0"]


def test_bad_files_and_arguments_say_what_is_wrong(res, tmp_path, capsys) -> None:
    pcapng = tmp_path / "a.pcapng"
    pcapng.write_bytes(b"\x0a\x0d\x0d\x0a" + bytes(40))
    assert res.main([str(pcapng)]) == 2
    assert "pcapng" in capsys.readouterr().err
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello")
    assert res.main([str(junk)]) == 2
    assert "not a pcap file" in capsys.readouterr().err
    wifi = tmp_path / "wifi.pcap"
    wifi.write_bytes(pcap([], link=105))
    assert res.main([str(wifi)]) == 2
    assert "link type 105" in capsys.readouterr().err
    assert res.main([str(tmp_path / "missing.pcap")]) == 2
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(pcap([]))
    assert res.main([str(empty)]) == 1
    assert "no SIP message" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        res.main([str(empty), "--proxy-ports", "70000"])
    assert "not a port range" in capsys.readouterr().err


def test_main_prints_the_table(res, tmp_path, capsys) -> None:
    capture = tmp_path / "call.pcap"
    capture.write_bytes(pcap(call_frames(9.0)))
    assert res.main([str(capture)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["kind", "paired"]
    assert any(line.split()[:3] == ["180/INVITE", "1", "40"] for line in out.splitlines())
