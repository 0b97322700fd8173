"""Real processes for integration tests: the proxy (`python -m proxy run`), SIPp and the
redis-servers a test owns.

Every helper here starts a real process on loopback and waits for it properly (port open, exit
code), so a test asserts on what real SIP peers did.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scripts" / "sipp"
REDIS_URL = os.environ.get("SIP700_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TEST_DIALOG_KEY = "c2lwNzAwLXRlc3QtZGlhbG9nLWtleS0zMi1ieXRlcyE="  # 32 bytes, tests only


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on `host` (`kind` is kept for callers; both are
    checked). Outside the kernel's ephemeral range: a client socket of this or another test
    (a Redis connection of `bindings import`, say) can neither hold it in TIME_WAIT when the
    proxy binds it nor take it afterwards."""
    del kind
    return free_port_range(1, host)


def port_taken(exc: Exception) -> bool:
    """`start_proxy` failed because a port drawn free was taken before the proxy bound it
    (another suite or program on the machine drew it too): the caller may draw again."""
    text = str(exc)
    return (("start_refused" in text or "worker_failed" in text)
            and "address already in use" in text.lower())  # the OS's words, or uvloop's


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for ports it picks itself (free_port's, SIPp's, every client's)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int, host: str) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


# its own generator: a test or library that seeds the global one (Hypothesis does, for its
# tests) must not make two draws of one test come out the same (a gateway on the proxy's port)
_RNG = random.SystemRandom()

# every port this process has handed out: free when drawn but perhaps not bound yet (a
# proxy's workers bind theirs a moment after the supervisor starts), so a later draw of the
# same test (its SIPp's port) must not take it; the oldest half forgotten once many have
# gone by
_HANDED_OUT: dict[int, int] = {}  # port -> the descriptor of its claim file (below)
_HANDED_OUT_MAX = 600

# the same across processes: another test suite on this machine (CI beside a developer's
# run) draws from the same range, and a port free when this one drew it could be bound by
# the other before this one's SIPp or proxy binds it. A port is claimed by holding an
# exclusive flock on a file named after it; a process's claims end with it.
_CLAIMS = Path(os.environ.get("SIP700_TEST_PORT_CLAIMS", "/tmp/sip700-test-ports"))


def _claim(port: int) -> int | None:
    """The descriptor of this process's claim on `port`, or None if another process holds it.

    The folder is shared by every user's suites (sticky and world-writable, as /tmp is) and a
    claim file is opened read-only (flock needs no write access), so a file another user made
    can be claimed too. Where the folder cannot be used at all, the port is this process's
    without a claim (an open /dev/null stands for it), as it was before claims existed."""
    try:
        if not _CLAIMS.is_dir():
            _CLAIMS.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                _CLAIMS.chmod(0o1777)
        path = _CLAIMS / str(port)
        try:  # an existing file without O_CREAT: fs.protected_regular refuses O_CREAT on
            fd = os.open(path, os.O_RDONLY)  # another user's file in a sticky folder
        except FileNotFoundError:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:
        return os.open(os.devnull, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _forget_claims(keep: int = 0) -> None:
    """Forget the oldest handed-out ports (their tests have long ended) and end their claims,
    keeping the newest `keep`: the running test's ports may not be bound yet."""
    for port in list(_HANDED_OUT)[:max(0, len(_HANDED_OUT) - keep)]:
        os.close(_HANDED_OUT.pop(port))  # the flock goes with the last descriptor


def free_port_range(count: int, host: str = "127.0.0.1", avoid: tuple[int, ...] = ()) -> int:
    """The first of `count` consecutive ports free for both UDP and TCP on `host`, none of
    them in `avoid` (ports handed out already but not bound yet: a proxy's listen port and its
    gateway's, or the proxy would take them as its workers' own ports).

    Drawn at random outside the kernel's ephemeral range, so that no port free_port (or any
    client socket) picks later can fall into it before the proxy binds it, and tests running
    side by side rarely draw the same range; claimed (see _CLAIMS) so that they never do.
    """
    low, high = _ephemeral_ports()
    spans = [(lo, hi) for lo, hi in ((20000, low), (high + 1, 65536)) if hi - lo > count]
    if not spans:
        spans = [(20000, 65536)]
    while True:
        lo, hi = _RNG.choice(spans)
        base = _RNG.randrange(lo, hi - count)
        ports = range(base, base + count)
        if not all(p not in avoid and p not in _HANDED_OUT and _bindable(p, host)
                   for p in ports):
            continue
        if len(_HANDED_OUT) + count > _HANDED_OUT_MAX:
            _forget_claims(keep=_HANDED_OUT_MAX // 2)
        claims = [(p, _claim(p)) for p in ports]
        held = [(p, fd) for p, fd in claims if fd is not None]
        if len(held) == count:
            _HANDED_OUT.update(held)
            return base
        for _p, fd in held:  # another suite holds one of them: draw again
            os.close(fd)


def config_workers(config: dict) -> int:
    """How many workers a config asks for (`auto` or absent: one per CPU)."""
    workers = config.get("workers", "auto")
    return max(1, os.cpu_count() or 1) if workers == "auto" else int(workers)


def wait_udp_bound(port: int, host: str = "127.0.0.1", timeout: float = 20.0,
                   proc: subprocess.Popen[bytes] | None = None, output: Path | None = None,
                   ) -> None:
    """Wait until something is bound to udp host:port (bind fails once it is). With `proc`
    (the process that should bind it): fail at once, with its output, if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return
        if proc is not None and proc.poll() is not None:
            said = output.read_text(errors="replace") if output else ""
            if len(said) > 3000:  # SIPp says why (a bind refused) first, then its screens
                said = f"{said[:1000]}\n[…]\n{said[-2000:]}"
            raise RuntimeError(f"exited with {proc.returncode} before binding udp "
                               f"{host}:{port}: {said}")
        time.sleep(0.05)
    raise TimeoutError(f"nothing bound udp {host}:{port} within {timeout}s")


def wait_tcp_listening(port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on tcp port (read from /proc: no connection is made,
    which would take a place under the caps, or start a TLS handshake)."""
    needle = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if (fields[1] + " ").endswith(needle) and fields[3] == "0A":  # 0A: LISTEN
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on tcp port {port}")


@dataclass
class ProxyProcess:
    """A running sip700 with the config it was given."""

    config_path: Path
    port: int
    gateway_port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    config: dict = field(default_factory=dict)

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def worker_pids(self) -> list[int]:
        """The supervisor's children: its workers."""
        pid = self.proc.pid
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def stop_and_read_stats(self) -> dict[str, int]:
        """Stop the proxy; the counters its workers log on the way out, summed."""
        self.stop()
        lines = [json.loads(ln) for ln in self.log_lines() if '"stopping"' in ln]
        if not lines:
            raise AssertionError("the proxy logged no stats when stopping")
        total: dict[str, int] = {}
        for line in lines:
            for name, value in line.get("stats", {}).items():
                total[name] = total.get(name, 0) + value
        return total

    def crash_lines(self) -> list[str]:
        """Log lines that show a bug: an internal error or a traceback."""
        return [ln for ln in self.log_lines() if "internal_error" in ln or "Traceback" in ln]

    def assert_clean_exit(self, rc: int) -> None:
        """The proxy logged no internal error and stopped on SIGTERM."""
        crashed = self.crash_lines()
        assert not crashed, "proxy logged internal errors:\n" + "\n".join(crashed[:20])
        assert rc in (0, -15), f"proxy exited with {rc}"

    def stop(self) -> int:
        return stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                 timeout: float = 10.0) -> int:
    """Send `sig` to a process still running, kill it if it has not ended within `timeout`
    seconds; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def write_config(
    tmp: Path, *, port: int, gateway_port: int, bindings: list[dict] | None = None,
    overrides: dict | None = None, transports: tuple[str, ...] = ("udp", "tcp"),
    redis_prefix: str | None = None,
) -> tuple[Path, dict]:
    """A proxy config for tests, written under tmp.

    transport.worker_port_base gets a free range (one port per worker) unless the overrides
    set it.

    Memory store by default; with `redis_prefix`, the Redis store on the machine's Redis under
    that key prefix, loaded with the same bindings by `sip700 bindings import` (the real CLI).
    """
    bindings_path = tmp / "bindings.yaml"
    if bindings is None:
        bindings = [
            {"type": "axb", "x": "700100000000001", "a": "13800000001", "b": "13900000001",
             "ttl": 3600},
            {"type": "axb", "x": "700100000000002", "a": "13800000002", "b": "13900000002",
             "ttl": 3600},
        ]
    bindings_path.write_text(yaml.safe_dump({"bindings": bindings}))
    if redis_prefix is None:
        store: dict = {"backend": "memory", "bindings_file": str(bindings_path)}
    else:
        store = {"backend": "redis", "redis_url": REDIS_URL, "key_prefix": redis_prefix}
    config: dict = {
        "listen": [f"{t}:127.0.0.1:{port}" for t in transports],
        "advertise": f"127.0.0.1:{port}",
        "trusted_peers": ["127.0.0.1/32"],
        "carrier": {"gateways": [f"sip:127.0.0.1:{gateway_port}"]},
        "store": store,
        "middle_number_pattern": r"^700\d{12}$",
        "privacy": {"dialog_key": TEST_DIALOG_KEY},
        "logging": {"level": "debug"},
        # the state file (`sip700 reload`, `run --takeover`) in the test's own directory
        "runtime_dir": str(tmp / "run"),
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    transport = config.setdefault("transport", {})
    if isinstance(transport, dict) and "worker_port_base" not in transport:
        # each worker's own ports (a range in use and the spare one for a hand-over): a free
        # range of their own, or tests side by side collide
        transport["worker_port_base"] = free_port_range(2 * config_workers(config),
                                                        avoid=(port, gateway_port))
    path = tmp / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    if redis_prefix is not None:
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "bindings", "import", str(bindings_path),
             "--config", str(path)], cwd=ROOT, capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"bindings import failed: {done.stdout!r} {done.stderr!r}")
    return path, config


def delete_redis_prefix(prefix: str) -> int:
    """Remove every key a test wrote under its prefix."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


@contextlib.asynccontextmanager
async def redis_prefix_client(name: str) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    """An asyncio client of the machine's Redis and a key prefix of the test's own
    (`sip700test:NAME:<random>:`), whose keys are deleted afterwards."""
    import redis.asyncio as aioredis

    prefix = f"sip700test:{name}:{uuid.uuid4().hex[:10]}:"
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        yield client, prefix
    finally:
        await client.aclose()
        delete_redis_prefix(prefix)


def start_redis_server(port: int, workdir: Path, *options: str) -> subprocess.Popen[bytes]:
    """A redis-server of the test's own on 127.0.0.1:`port` (no RDB snapshots, its files in
    `workdir`, `options` besides), once it answers PING."""
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port),
         "--bind", "127.0.0.1", "--save", "", *options, "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_redis_ping(port)
    except RuntimeError:
        proc.kill()
        proc.wait()
        raise RuntimeError("redis-server did not start") from None
    return proc


def wait_redis_ping(port: int, timeout: float = 10.0) -> None:
    """Until a Redis on 127.0.0.1:`port` answers PING."""
    import redis

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            if redis.Redis(port=port, socket_timeout=0.2).ping():
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answers on port {port}")


def start_proxy(config_path: Path, port: int, gateway_port: int, log_path: Path,
                config: dict | None = None) -> ProxyProcess:
    """Start `python -m proxy run --config …` and wait for its UDP port (its TCP port when
    the config has no udp listen entry)."""
    log = log_path.open("ab")
    start = log.tell()  # a proxy restarted in the same directory appends to the old log
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--config", str(config_path)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        if config and not any(str(e).startswith("udp:") for e in config.get("listen", ["udp:"])):
            wait_tcp_listening(port, timeout=20)
        else:
            wait_udp_bound(port)
        wait_all_listening(config or {}, proc)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"proxy did not start:\n{log_path.read_text()}") from None
    with log_path.open("rb") as written:
        written.seek(start)
        text = written.read().decode(errors="replace")
    if port_taken(RuntimeError(text)):
        # a worker's own port was taken between the draw and its bind; the supervisor
        # restarted it, but the test would fail on the logged error: let the caller draw again
        stop_process(proc)
        raise RuntimeError(f"a worker could not bind its port:\n{text}")
    return ProxyProcess(config_path, port, gateway_port, proc, log_path, config or {})


def start_on_fresh_ports(configure: Callable[[], tuple[Path, dict, int, int, Path]],
                         attempts: int = 3) -> ProxyProcess:
    """start_proxy for what `configure()` writes (config path, config, port, gateway port, log
    path) on ports it draws; configured and started again when a port drawn free was taken
    before the proxy bound it (port_taken). The ports are the returned process's."""
    for attempt in range(attempts):
        path, config, port, gateway_port, log_path = configure()
        try:
            return start_proxy(path, port, gateway_port, log_path, config)
        except RuntimeError as exc:
            if attempt == attempts - 1 or not port_taken(exc):
                raise
    raise AssertionError("unreachable")


def wait_all_listening(config: dict, proc: subprocess.Popen[bytes], timeout: float = 30.0
                       ) -> None:
    """Wait until the supervisor's state file names it: every worker listens (a bound port
    alone can be the start-up check's probe, or the first of several workers)."""
    run_dir = config.get("runtime_dir")
    if not run_dir:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TimeoutError("the proxy exited")
        for state in Path(run_dir).glob("sip700-*.json"):
            try:
                if json.loads(state.read_text()).get("pid") == proc.pid:
                    return
            except (OSError, ValueError):
                pass
        time.sleep(0.05)
    raise TimeoutError(f"no state file for pid {proc.pid} in {run_dir}")


@dataclass
class SippResult:
    returncode: int
    successful: int
    failed: int
    stdout: str
    stderr: str
    errors: str

    def __str__(self) -> str:
        return (f"sipp rc={self.returncode} successful={self.successful} failed={self.failed}\n"
                f"errors:\n{self.errors[-3000:]}\nstderr:\n{self.stderr[-2000:]}")


def sipp_args(
    scenario: str, *, remote: str | None, local_port: int, calls: int = 1, rate: float = 10,
    csv: Path | None = None, transport: str = "u1", local_ip: str = "127.0.0.1",
    extra: list[str] | None = None, workdir: Path,
) -> list[str]:
    args = ["sipp", "-sf", str(SCENARIOS / scenario), "-i", local_ip, "-p", str(local_port),
            "-t", transport, "-m", str(calls), "-r", str(rate), "-nostdin",
            "-trace_err", "-error_file", str(workdir / f"{scenario}.{local_port}.errors.log"),
            "-trace_stat", "-stf", str(workdir / f"{scenario}.{local_port}.stat.csv")]
    if csv is not None:
        # SIPp matches -infindex against the -inf text: pass names relative to the workdir
        args += ["-inf", os.path.relpath(csv, workdir)]
    args += extra or []
    if remote:
        args.append(remote)
    return args


def _parse_counts(workdir: Path, scenario: str, port: int) -> tuple[int, int]:
    stat = workdir / f"{scenario}.{port}.stat.csv"
    if not stat.exists():
        return 0, 0
    lines = [ln for ln in stat.read_text().splitlines() if ln.strip()]
    if len(lines) < 2:
        return 0, 0
    header = lines[0].split(";")
    last = lines[-1].split(";")
    row = dict(zip(header, last, strict=False))
    return int(row.get("SuccessfulCall(C)", 0)), int(row.get("FailedCall(C)", 0))


@contextlib.contextmanager
def sipp_server(scenario: str, port: int, workdir: Path, *, calls: int = 0,
                csv: Path | None = None, transport: str = "u1",
                extra: list[str] | None = None, local_ip: str = "127.0.0.1",
                ) -> Iterator[subprocess.Popen[bytes]]:
    """A SIPp UAS (or any scenario that waits for traffic) in the background."""
    args = sipp_args(scenario, remote=None, local_port=port, calls=calls or 1000000,
                     csv=csv, transport=transport, extra=extra, workdir=workdir,
                     local_ip=local_ip)
    out_path = workdir / f"{scenario}.{port}.out"
    out = out_path.open("wb")
    proc = subprocess.Popen(args, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    try:
        if transport.startswith("u"):
            wait_udp_bound(port, local_ip, proc=proc, output=out_path)
        else:
            time.sleep(0.5)
        yield proc
    finally:
        stop_process(proc, signal.SIGUSR1, timeout=5)  # SIPp: dump stats and quit


def server_counts(scenario: str, port: int, workdir: Path) -> tuple[int, int]:
    """(successful, failed) calls of a finished sipp_server."""
    return _parse_counts(workdir, scenario, port)


def run_sipp(scenario: str, remote: str, port: int, workdir: Path, *, calls: int = 1,
             rate: float = 10, csv: Path | None = None, transport: str = "u1",
             local_ip: str = "127.0.0.1", extra: list[str] | None = None,
             timeout: float = 60) -> SippResult:
    """Run a SIPp client scenario to completion; returns its exit code and counts."""
    args = sipp_args(scenario, remote=remote, local_port=port, calls=calls, rate=rate, csv=csv,
                     transport=transport, local_ip=local_ip, extra=extra, workdir=workdir)
    done = subprocess.run(args, cwd=workdir, capture_output=True, timeout=timeout, check=False)
    ok, failed = _parse_counts(workdir, scenario, port)
    err_file = workdir / f"{scenario}.{port}.errors.log"
    errors = err_file.read_text(errors="replace") if err_file.exists() else ""
    return SippResult(done.returncode, ok, failed, done.stdout.decode(errors="replace"),
                      done.stderr.decode(errors="replace"), errors)
