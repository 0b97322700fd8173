"""Neither party of a call learns the other's number, whatever header or form carries it.

Real processes: the proxy (`python -m proxy run`, memory store) and SIPp on both legs. The caller
(scripts/sipp/uac_privacy_caller.xml) writes its own number into every identity header, display
names, Contact and SDP, as 13800000001, +8613800000001, 008613800000001 and 8613800000001; the
carrier-leg callee (uas_privacy_callee.xml) fails the call if any caller-range number (138…)
reaches it and checks Request-URI = B, From = P-Asserted-Identity = X. The callee answers with
its own number everywhere and the caller fails the call if any callee-range number (139…) comes
back. The scenarios' regexps are static, hence the layout: callers 138…, callees 139….
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.procs import (
    ProxyProcess,
    SippResult,
    free_port,
    run_sipp,
    server_counts,
    sipp_server,
)

CALLER = "uac_privacy_caller.xml"
CALLEE = "uas_privacy_callee.xml"
X = "700100000000001"
A = "13800000001"
B = "13900000001"


def callee_keys(b: str, x: str) -> list[str]:
    """SIPp -key arguments of uas_privacy_callee.xml (B's number, the middle number)."""
    return ["-key", "b", b, "-key", "x", x, "-trace_logs"]


def caller_keys(ruri: str, from_uri: str, pai_uri: str, a: str, x: str) -> list[str]:
    """SIPp -key arguments of uac_privacy_caller.xml."""
    return ["-key", "ruri", ruri, "-key", "from_uri", from_uri, "-key", "pai_uri", pai_uri,
            "-key", "a", a, "-key", "x", x]


def callee_failures(workdir: Path) -> str:
    """What uas_privacy_callee.xml logged about failed checks (its -trace_logs file)."""
    return "".join(p.read_text(errors="replace") for p in workdir.glob("uas_*_logs.log"))


def assert_private_call(result: SippResult, callee: tuple[int, int], workdir: Path,
                        calls: int = 1) -> None:
    """Both legs finished every call and every privacy check passed."""
    detail = f"{result}\ncallee log:\n{callee_failures(workdir)}"
    assert result.returncode == 0, detail
    assert result.successful == calls and result.failed == 0, detail
    assert callee == (calls, 0), detail


def assert_log_masks(proxy: ProxyProcess, *numbers: str) -> None:
    """The proxy's log (debug level in tests) never holds a real number in full."""
    leaking = [ln for ln in proxy.log_lines() if any(n in ln for n in numbers)]
    assert not leaking, "unmasked numbers in the proxy log:\n" + "\n".join(leaking[:5])


# Request-URI / From / P-Asserted-Identity forms of X and A (RFC 3966 tel:, +86, 0086, user=phone)
FORMS = {
    "national": (f"sip:{X}@127.0.0.1", f"sip:{A}@127.0.0.1", f"sip:{A}@127.0.0.1"),
    "plus86_user_phone": (f"sip:+86{X}@127.0.0.1;user=phone",
                          f"sip:+86{A}@127.0.0.1;user=phone", f"tel:+86{A}"),
    "0086": (f"sip:0086{X}@127.0.0.1", f"sip:0086{A}@127.0.0.1", f"sip:0086{A}@127.0.0.1"),
    "tel_with_separators": ("tel:+86-700-1000-0000-0001", f"tel:+86{A}", f"tel:+86{A}"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_neither_party_sees_the_others_number(
    start_sip700: Callable[..., ProxyProcess], tmp_path: Path, form: str
) -> None:
    """A → X → B: every form of A is gone from what B gets, every form of B from what A gets."""
    ruri, from_uri, pai_uri = FORMS[form]
    proxy = start_sip700()
    with sipp_server(CALLEE, proxy.gateway_port, tmp_path, extra=callee_keys(B, X)):
        result = run_sipp(CALLER, f"127.0.0.1:{proxy.port}", free_port(), tmp_path,
                          calls=2, extra=caller_keys(ruri, from_uri, pai_uri, A, X))
        time.sleep(0.2)  # the callee's last 200 OK is on its way
    assert_private_call(result, server_counts(CALLEE, proxy.gateway_port, tmp_path),
                        tmp_path, calls=2)
    assert_log_masks(proxy, A, B)


def test_callee_to_caller_direction(
    start_sip700: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    """B → X → A: the binding's b side calls X and reaches a, with the same checks."""
    x = "700100000000003"
    a, b = "13900000003", "13800000003"  # a is the callee here: keep callers in 138…
    proxy = start_sip700(bindings=[{"type": "axb", "x": x, "a": a, "b": b, "ttl": 3600}])
    with sipp_server(CALLEE, proxy.gateway_port, tmp_path, extra=callee_keys(a, x)):
        result = run_sipp(CALLER, f"127.0.0.1:{proxy.port}", free_port(), tmp_path,
                          extra=caller_keys(f"sip:{x}@127.0.0.1", f"sip:{b}@127.0.0.1",
                                            f"tel:+86{b}", b, x))
        time.sleep(0.2)
    assert_private_call(result, server_counts(CALLEE, proxy.gateway_port, tmp_path), tmp_path)
    assert_log_masks(proxy, a, b)


def test_callee_checks_catch_a_leak_without_the_proxy(tmp_path: Path) -> None:
    """The callee's checks can fail: caller straight to callee, A's number arrives untouched."""
    port = free_port()
    with sipp_server(CALLEE, port, tmp_path, extra=callee_keys(B, X)):
        result = run_sipp(CALLER, f"127.0.0.1:{port}", free_port(), tmp_path,
                          extra=caller_keys(*FORMS["national"], A, X), timeout=30)
        time.sleep(0.2)
    assert result.returncode != 0 and result.successful == 0, result
    assert server_counts(CALLEE, port, tmp_path) == (0, 1)
    verdict = callee_failures(tmp_path)
    assert "PRIVACY CHECK FAILED" in verdict and f"leak='{A}" in verdict, verdict


def test_caller_checks_catch_a_leak_without_the_proxy(tmp_path: Path) -> None:
    """The caller's checks can fail: a callee that answers with its own number, no proxy."""
    port = free_port()
    with sipp_server("uas_demo.xml", port, tmp_path):
        # the demo callee presents the Request-URI user as its identity: B's own number
        result = run_sipp(CALLER, f"127.0.0.1:{port}", free_port(), tmp_path,
                          extra=caller_keys(f"sip:{B}@127.0.0.1", f"sip:{A}@127.0.0.1",
                                            f"sip:{A}@127.0.0.1", A, X), timeout=30)
    assert result.returncode != 0 and result.successful == 0, result
    assert re.search(r"139\[0-9\]\{8\}", result.errors), result.errors  # the leak regexp fired


def test_malformed_request_quoting_a_number_is_logged_masked(
    start_sip700: Callable[..., ProxyProcess]
) -> None:
    """A parse error's reason quotes the bad header: the number in it is masked in the log."""
    proxy = start_sip700()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(2)
        s.sendto((
            f"INVITE sip:{X}@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{s.getsockname()[1]};branch=z9hG4bKunquoted\r\n"
            f"From: Bell, {A} <sip:{A}@127.0.0.1>;tag=1\r\n"  # display name must be quoted
            f"To: <sip:{X}@127.0.0.1>\r\nCall-ID: unquoted-display@127.0.0.1\r\n"
            "CSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        ).encode(), ("127.0.0.1", proxy.port))
        assert s.recv(9000).startswith(b"SIP/2.0 400 ")
    time.sleep(0.2)  # the log line is written after the answer
    assert any('"malformed"' in ln and "138****0001" in ln for ln in proxy.log_lines())
    assert_log_masks(proxy, A)
