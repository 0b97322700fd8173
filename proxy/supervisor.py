"""`sip700 run`: the supervisor, its workers, and what every signal means.

The supervisor loads and checks the config (and the memory store, whose pages its workers then
share), forks the workers, restarts one that dies, and turns the operator's signals into the
workers' (it handles signals synchronously with sigtimedwait, so none lands in the middle of a
restart or a reload):

- SIGHUP: reload the config file. It is validated first; a valid one goes to every worker
  (new calls use it, calls in progress keep theirs); an invalid one is refused and logged,
  and the running config stays.
- SIGTERM, SIGINT: drain. No new calls (`shutdown.mode`), transactions in progress finish
  within `shutdown.drain_s`, exit 0. A second one stops at once.
- SIGQUIT: stop at once, without draining (exit 0).
- SIGUSR1: a `status` log line from the supervisor and from each worker.
- SIGUSR2: hand-over (sent by `sip700 run --takeover`): give back the spare worker-port
  range; the SIGTERM that follows drains by closing the shared port.
- SIGCHLD: internal: a worker exited; it is restarted unless the proxy is stopping.

Workers run in a process group of their own (a Ctrl-C reaches the supervisor only) and die with
it: PR_SET_PDEATHSIG sends them SIGTERM, and a worker whose parent is gone stops at once. A
worker sent SIGTERM directly drains and is restarted (a rolling restart of one worker).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from proxy.config import Config, ListenEndpoint
from proxy.logs import flush as flush_logs

log = structlog.get_logger("sip700")

HANDLED = (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
           signal.SIGUSR1, signal.SIGUSR2)
READY_TIMEOUT_S = 120.0  # a worker that has not opened its ports by then has failed
QUICK_DEATH_S = 5.0
SPARE_WAIT_S = 10.0  # how long a takeover waits for the running instance's spare range


class StartRefused(Exception):
    """`run` cannot start; the message says why and what to do."""


# ---- the runtime directory and the state file ------------------------------------------------

def runtime_dir(cfg: Config) -> Path:
    """Where the state file lives (config `runtime_dir`, else the environment)."""
    if cfg.runtime_dir is not None:
        return Path(cfg.runtime_dir)
    if os.environ.get("SIP700_RUNTIME_DIR"):
        return Path(os.environ["SIP700_RUNTIME_DIR"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "sip700"
    return Path(tempfile.gettempdir()) / f"sip700-{os.getuid()}"


def state_path(cfg: Config) -> Path:
    """One state file per SIP address: the instance that holds listen[0]."""
    ep = cfg.listen_endpoints[0]
    host = ep.host.replace(":", "_")
    return runtime_dir(cfg) / f"sip700-{ep.transport}-{host}-{ep.port}.json"


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_instance(cfg: Config) -> dict[str, Any] | None:
    """The state of the instance holding this config's SIP address, if it is alive."""
    state = read_state(state_path(cfg))
    if state is None or not isinstance(state.get("pid"), int) or not alive(state["pid"]):
        return None
    return state


# ---- ports -----------------------------------------------------------------------------------

def port_held(transport: str, host: str, port: int) -> OSError | None:
    """Whether a socket already holds transport:host:port; the error a bind would meet, or
    None if free. Read from the kernel's socket tables (/proc/net), so that nothing watching
    the port sees it bound for a moment; a test bind where they cannot be read."""
    try:
        held = _in_socket_tables(transport, host, port)
    except OSError:
        held = None
    if held is not None:
        return OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)) if held else None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    with socket.socket(family, kind) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no holder
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc
    return None


_TCP_LISTEN = "0A"


def _in_socket_tables(transport: str, host: str, port: int) -> bool | None:
    """Whether /proc/net/{udp,tcp}[6] lists a socket bound to host:port (TCP: listening),
    counting wildcard binds on either side; None when the tables cannot be read."""
    want = ipaddress.ip_address(host)
    found_any_table = False
    for suffix in ("", "6"):
        path = Path(f"/proc/net/{transport}{suffix}")
        try:
            lines = path.read_text().splitlines()[1:]
        except OSError:
            continue
        found_any_table = True
        for line in lines:
            fields = line.split()
            if len(fields) < 4:
                continue
            address, _, port_hex = fields[1].partition(":")
            if int(port_hex, 16) != port:
                continue
            if transport == "tcp" and fields[3] != _TCP_LISTEN:
                continue
            bound = _proc_address(address)
            if bound.is_unspecified or want.is_unspecified or bound == want or (
                    isinstance(bound, ipaddress.IPv6Address) and bound.ipv4_mapped == want):
                return True
    return False if found_any_table else None


def _proc_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net writes it: hex of 32-bit words in host byte order."""
    raw = bytes.fromhex(text)
    words = [raw[i:i + 4][::-1] if sys.byteorder == "little" else raw[i:i + 4]
             for i in range(0, len(raw), 4)]
    packed = b"".join(words)
    return ipaddress.IPv4Address(packed) if len(packed) == 4 else ipaddress.IPv6Address(packed)


def held_addresses(endpoints: list[ListenEndpoint]) -> list[str]:
    """`udp:127.0.0.1:5060 (Address already in use)` for each endpoint something holds."""
    out = []
    for ep in endpoints:
        exc = port_held(ep.transport, ep.host, ep.port)
        if exc is not None:
            out.append(f"{ep} ({exc.strerror})")
    return out


def range_endpoints(cfg: Config, which: int) -> list[ListenEndpoint]:
    """The sockets the workers' own ports of range `which` take."""
    hosts = dict.fromkeys((e.transport, e.host) for e in cfg.listen_endpoints)
    return [ListenEndpoint(t, h, p) for p in cfg.worker_port_range(which) for t, h in hosts]


# ---- the supervisor --------------------------------------------------------------------------

class Supervisor:
    """Forks and watches the workers; see the module docstring for the signals."""

    def __init__(self, cfg: Config, config_path: str, key: bytes, store: Any = None,
                 *, takeover: bool = False) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.key = key
        self.store = store  # the memory store, loaded once; None: each worker opens Redis
        self.takeover = takeover
        self.port_range = 0
        self.generation = 1
        self.children: dict[int, int] = {}  # pid → worker index
        self.pids: dict[int, int] = {}  # worker index → pid
        self.started: dict[int, float] = {}
        self.quick_deaths: dict[int, int] = {}
        self.ready: set[int] = set()
        self.ready_pipes: dict[int, int] = {}  # read end → worker index
        self.stopping = False
        self.stop_deadline: float | None = None
        self.exit_code = 0
        self.state_file = state_path(cfg)
        self.state: dict[str, Any] = {}
        self.group = ""
        self.relay_key = os.urandom(32)
        self.previous: dict[str, Any] | None = None  # the instance taken over
        self.published = False  # the state file names this instance (all workers listened)
        self.cpus: tuple[int, ...] | None = None  # worker i runs on cpus[i] (None: anywhere)
        self.board: Any = None  # the workers' shared steering state (proxy/steering.py)

    # ---- start -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Plan the workers' CPUs (worker_cpu_affinity) and check the ports (refuse a second
        instance; arrange a takeover); StartRefused."""
        cfg = self.cfg
        try:
            self.cpus, why = cfg.worker_cpus()
        except ValueError as exc:
            raise StartRefused(str(exc)) from None
        log.info("worker_cpu_affinity", cpus=list(self.cpus) if self.cpus else None, why=why)
        held = held_addresses(list(cfg.listen_endpoints))
        running = running_instance(cfg)
        stale = read_state(self.state_file) or {}
        if not held:
            if self.takeover:
                log.info("takeover_nothing_running", listen=[str(e) for e in cfg.listen_endpoints])
                self.takeover = False
            # keep the range the last instance used: its calls' Record-Routes name it
            self.port_range = int(stale.get("port_range", 0)) if cfg.worker_ports else 0
            if cfg.worker_ports and held_addresses(range_endpoints(cfg, self.port_range)):
                other = 1 - self.port_range
                if held_addresses(range_endpoints(cfg, other)):
                    busy = held_addresses(range_endpoints(cfg, self.port_range))
                    raise StartRefused(f"the workers' own ports are in use: {', '.join(busy)} "
                                       "(transport.worker_port_base); free them or choose "
                                       "another range")
                self.port_range = other
            return
        who = (f"sip700 pid {running['pid']} (config {running.get('config')})"
               if running else "another process")
        if not self.takeover:
            hint = (f"to replace it without dropping calls: sip700 run --takeover --config "
                    f"{self.config_path}; to stop it: kill -TERM {running['pid']}"
                    if running else "stop it, or change `listen`")
            raise StartRefused(f"{', '.join(held)}: held by {who}; refusing to start a second "
                               f"instance on the same address (every call would fail). {hint}")
        if running is None:
            raise StartRefused(f"--takeover: {', '.join(held)} is held, but no running sip700 "
                               f"was found in {self.state_file}: nothing to take over from")
        if cfg.privacy.dialog_key_bytes is None:
            raise StartRefused("--takeover needs privacy.dialog_key (or dialog_key_file), the "
                               "same as the running instance's: with a random key the new "
                               "process could not serve the calls in progress")
        if running.get("workers") != cfg.workers or \
                running.get("worker_ports") != [list(cfg.worker_port_range(0)),
                                                list(cfg.worker_port_range(1))]:
            raise StartRefused(f"--takeover: the running instance (pid {running['pid']}) has "
                               f"workers: {running.get('workers')} and worker ports "
                               f"{running.get('worker_ports')}; this config has workers: "
                               f"{cfg.workers} and ports {list(cfg.worker_port_range(0))}, "
                               f"{list(cfg.worker_port_range(1))}: a hand-over keeps them "
                               "(stop and start to change them)")
        self.previous = running
        self.port_range = 1 - int(running.get("port_range", 0)) if cfg.worker_ports else 0
        log.info("takeover_started", previous_pid=running["pid"], port_range=self.port_range)
        os.kill(running["pid"], signal.SIGUSR2)  # give back the spare range
        deadline = time.monotonic() + SPARE_WAIT_S
        while held_addresses(range_endpoints(self.cfg, self.port_range)):
            if time.monotonic() > deadline:
                busy = held_addresses(range_endpoints(self.cfg, self.port_range))
                raise StartRefused(f"--takeover: the spare worker ports are still held after "
                                   f"{SPARE_WAIT_S:.0f} s: {', '.join(busy)}")
            time.sleep(0.02)

    def run(self) -> int:
        """Fork the workers and supervise them until they have all stopped."""
        self.group = tempfile.mkdtemp(prefix="sip700-")  # the workers' relay sockets live here
        # what every worker imports, imported once here: workers start sooner and share it
        import prometheus_client  # noqa: F401
        import uvloop  # noqa: F401

        import proxy.core
        import proxy.metrics
        import proxy.transport  # noqa: F401
        if self.cfg.workers > 1 and self.cfg.transport.low_load.enabled:
            from proxy.steering import Board

            # before the forks: one mapping every worker shares, a restarted one too
            udp_ports = sum(1 for e in self.cfg.listen_endpoints if e.transport == "udp")
            self.board = Board(self.cfg.workers, udp_ports)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            for index in range(self.cfg.workers):
                self.fork(index)
            log.info("supervisor_started", workers=self.cfg.workers, config=self.config_path,
                     generation=self.generation, port_range=self.port_range,
                     takeover=self.previous is not None)
            self.loop()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            shutil.rmtree(self.group, ignore_errors=True)
            mine = read_state(self.state_file)
            if mine is not None and mine.get("pid") == os.getpid():
                with contextlib.suppress(OSError):
                    self.state_file.unlink()
            deadline = time.monotonic() + 1.0  # a slow stdout reader: a moment for what waits
            while not flush_logs() and time.monotonic() < deadline:
                time.sleep(0.01)
        return self.exit_code

    def fork(self, index: int) -> None:
        from proxy.worker import Worker, die_with_parent

        read_end, write_end = os.pipe()
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                os.close(read_end)
                os.setpgid(0, 0)  # a terminal's Ctrl-C goes to the supervisor alone
                die_with_parent()
                if os.getppid() != supervisor:  # it died before the line above
                    os._exit(1)
                for sig in HANDLED:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
                if self.cpus is not None:  # its own CPU: its caches stay warm, no migrations
                    try:
                        os.sched_setaffinity(0, {self.cpus[index]})
                    except OSError as exc:  # the CPU went offline since the start: run anywhere
                        log.warning("worker_cpu_affinity_failed", worker=index,
                                    cpu=self.cpus[index], error=str(exc))
                worker = Worker(self.cfg, self.key, self.store, index=index,
                                count=self.cfg.workers, group=self.group,
                                relay_key=self.relay_key, port_range=self.port_range,
                                supervisor_pid=supervisor, ready_fd=write_end,
                                generation=self.generation, config_path=self.config_path,
                                board=self.board)
                run_loop(worker.run())
            except BaseException as exc:
                log.exception("worker_failed", worker=index, error=str(exc),
                              errno=getattr(exc, "errno", None), error_type=type(exc).__name__)
                code = 1
            os._exit(code)
        os.close(write_end)
        os.set_blocking(read_end, False)
        self.ready_pipes[read_end] = index
        self.children[pid] = index
        self.pids[index] = pid
        self.started[index] = time.monotonic()

    # ---- the loop ----------------------------------------------------------------------------
    def loop(self) -> None:
        while self.children:
            info = signal.sigtimedwait(HANDLED, 0.1)
            self.read_ready()
            if info is not None:
                self.on_signal(info.si_signo)
            self.reap()
            if self.stop_deadline is not None and time.monotonic() > self.stop_deadline:
                log.error("workers_did_not_stop", pids=sorted(self.children))
                self.signal_workers(signal.SIGKILL)
                self.stop_deadline = None

    def read_ready(self) -> None:
        for fd, index in list(self.ready_pipes.items()):
            try:
                data = os.read(fd, 16)
            except BlockingIOError:
                if time.monotonic() - self.started[index] > READY_TIMEOUT_S:
                    log.error("worker_not_ready", worker=index, waited_s=READY_TIMEOUT_S)
                    self._close_pipe(fd)
                continue
            except OSError:
                data = b""
            self._close_pipe(fd)
            if data.startswith(b"R"):
                self.ready.add(index)
                if self.board is not None and len(self.ready) == self.cfg.workers:
                    self.board.set_ready(True)  # every shared socket bound: learn who is who
                if len(self.ready) == self.cfg.workers and not self.published:
                    self.published = True
                    self.all_ready()

    def _close_pipe(self, fd: int) -> None:
        self.ready_pipes.pop(fd, None)
        with contextlib.suppress(OSError):
            os.close(fd)

    def all_ready(self) -> None:
        """Every worker listens: publish the state file; a takeover now drains the old one."""
        self.write_state()
        if self.previous is not None:
            pid = self.previous["pid"]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            log.info("takeover_done", previous_pid=pid)

    def write_state(self, **extra: Any) -> None:
        self.state.update({
            "pid": os.getpid(), "config": self.config_path, "generation": self.generation,
            "port_range": self.port_range, "workers": self.cfg.workers,
            "worker_ports": [list(self.cfg.worker_port_range(0)),
                             list(self.cfg.worker_port_range(1))],
            "listen": [str(e) for e in self.cfg.listen_endpoints],
            "metrics": self.cfg.metrics.listen,
        }, **extra)
        with contextlib.suppress(OSError):
            write_state(self.state_file, self.state)

    def on_signal(self, signo: int) -> None:
        if signo == signal.SIGHUP:
            self.reload()
        elif signo in (signal.SIGTERM, signal.SIGINT):
            if self.stopping:
                log.info("stopping_now", signal=signal.Signals(signo).name)
                self.signal_workers(signal.SIGQUIT)
            else:
                self.stopping = True
                self.stop_deadline = time.monotonic() + self.cfg.shutdown.drain_s + 10.0
                log.info("supervisor_draining", signal=signal.Signals(signo).name,
                         drain_s=self.cfg.shutdown.drain_s)
                self.signal_workers(signal.SIGTERM)
        elif signo == signal.SIGQUIT:
            self.stopping = True
            self.stop_deadline = time.monotonic() + 10.0
            self.signal_workers(signal.SIGQUIT)
        elif signo == signal.SIGUSR1:
            log.info("status", supervisor=os.getpid(), generation=self.generation,
                     config=self.config_path, workers=sorted(self.pids.items()),
                     stopping=self.stopping)
            self.signal_workers(signal.SIGUSR1)
        elif signo == signal.SIGUSR2:
            log.info("handover_requested")
            self.signal_workers(signal.SIGUSR2)

    def signal_workers(self, sig: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is None:
                continue
            self.pids.pop(index, None)
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                if code != 0:
                    log.warning("worker_exit", worker=index, exit=code)
                    self.exit_code = 1 if code > 0 else self.exit_code
                continue
            self.ready.discard(index)
            if self.board is not None:  # its socket left the groups: the kernel renumbered
                self.board.set_ready(False)
                self.board.forget()
            lived = time.monotonic() - self.started.get(index, 0.0)
            quick = self.quick_deaths.get(index, 0) + 1 if lived < QUICK_DEATH_S else 0
            self.quick_deaths[index] = quick
            log.error("worker_died", worker=index, exit=code, lived_s=round(lived, 1))
            if quick >= 5:  # it cannot start (port taken, bad store …): give up
                log.error("worker_cannot_start", worker=index,
                          detail="died 5 times within 5 s of starting: see worker_failed")
                self.exit_code = 1
                self.stopping = True
                self.stop_deadline = time.monotonic() + self.cfg.shutdown.drain_s + 10.0
                self.signal_workers(signal.SIGTERM)
                continue
            time.sleep(0.2)  # no restart storm if a worker dies at start-up
            self.fork(index)

    # ---- reload ------------------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the config file; hand a valid one to every worker."""
        from proxy.reload import effective_config, restart_required, validate_file

        path = self.config_path
        reloads = int(self.state.get("reloads", 0)) + 1
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            text, problems, new, check = None, [f"{path}: cannot read: {exc}"], None, None
        else:
            new, check, problems = validate_file(path, text)
        if new is None or text is None:
            log.error("config_reload_refused", config=path, problems=problems,
                      generation=self.generation,
                      detail="the running config stays in force")
            self.write_state(reloads=reloads, last_reload={"ok": False, "problems": problems})
            return
        assert check is not None
        changed = restart_required(self.cfg, new)
        self.generation += 1
        data = {"generation": self.generation, "path": path, "text": text}
        target = Path(self.group) / "config.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, target)
        self.cfg = effective_config(self.cfg, new, Path(path).resolve().parent)
        if check.store is not None:  # for workers forked from now on
            import gc

            self.store = check.store
            gc.collect()
            gc.freeze()
        self.signal_workers(signal.SIGHUP)
        log.info("config_reloaded", config=path, generation=self.generation,
                 gateways=list(self.cfg.carrier.gateways),
                 bindings_loaded=check.loaded if check.store is not None else None,
                 rows_skipped=len(check.problems), warnings=check.warnings,
                 **({"restart_required": changed} if changed else {}))
        self.write_state(reloads=reloads, last_reload={
            "ok": True, "generation": self.generation, "restart_required": changed,
            "warnings": [*check.problems[:20], *check.warnings]})


def run_loop(main: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        import asyncio

        asyncio.run(main)
    else:
        uvloop.run(main)
