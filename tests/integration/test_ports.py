"""The test harness's port draws: what one suite hands out, no other suite on the machine
draws before it is bound (CI beside a developer's run once collided on a SIPp port)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.integration import procs

ROOT = Path(__file__).resolve().parents[2]


def _draw_in_another_process(claims: Path, count: int) -> subprocess.Popen[str]:
    """A second Python process that draws `count` single ports, prints them, and keeps its
    claims until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from tests.integration.procs import free_port
        print(" ".join(str(free_port()) for _ in range({count})), flush=True)
        sys.stdin.read()
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={"SIP700_TEST_PORT_CLAIMS": str(claims), "PATH": ""})


def _assert_claimable(ports: list[int]) -> None:
    """Each of `ports` can be claimed by this process now (nobody else holds it)."""
    for port in ports:
        fd = procs._claim(port)
        assert fd is not None, port
        procs.os.close(fd)


def test_a_port_another_process_holds_is_never_drawn_and_is_free_again_when_it_ends(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(procs, "_CLAIMS", tmp_path)
    monkeypatch.setattr(procs, "_HANDED_OUT", {})
    # another process claims 200 of the ~16,000 ports; 300 draws here would hit a few of
    # them if claims were not honoured
    other = _draw_in_another_process(tmp_path, 200)
    assert other.stdout is not None
    held = [int(p) for p in other.stdout.readline().split()]
    assert len(set(held)) == 200
    assert {p.name for p in tmp_path.iterdir()} >= {str(p) for p in held}
    for port in held:
        assert procs._claim(port) is None, port  # claimed elsewhere: refused here
    drawn = {procs.free_port() for _ in range(300)}
    assert not drawn & set(held)
    # its claims end with it: the same ports can be claimed here now
    assert other.stdin is not None
    other.stdin.close()
    assert other.wait(timeout=10) == 0
    _assert_claimable(held)


def test_this_process_forgets_its_oldest_claims_and_keeps_the_newest(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(procs, "_CLAIMS", tmp_path)
    monkeypatch.setattr(procs, "_HANDED_OUT", {})
    monkeypatch.setattr(procs, "_HANDED_OUT_MAX", 10)
    first = [procs.free_port() for _ in range(10)]
    assert set(procs._HANDED_OUT) == set(first)
    last = procs.free_port()  # the eleventh: the oldest five are forgotten, their claims ended
    assert list(procs._HANDED_OUT) == [*first[5:], last]
    _assert_claimable(first[:5])
    for port in [*first[5:], last]:  # still held: even another descriptor here is refused
        assert procs._claim(port) is None, port


def test_ports_are_still_drawn_where_the_claims_folder_cannot_be_made(
    tmp_path: Path, monkeypatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(procs, "_CLAIMS", blocker / "claims")  # under a file: mkdir fails
    monkeypatch.setattr(procs, "_HANDED_OUT", {})
    drawn = [procs.free_port() for _ in range(20)]
    assert len(set(drawn)) == 20  # still never the same port twice in this process
    assert set(procs._HANDED_OUT) == set(drawn)
    assert not (blocker / "claims").exists()
    procs._forget_claims()
    assert procs._HANDED_OUT == {}
