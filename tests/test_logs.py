"""The non-blocking log writer batches the records of one event-loop pass into one write."""

from __future__ import annotations

import asyncio
import os

from proxy.logs import NonBlockingLineWriter


def test_records_of_one_loop_pass_go_out_in_one_write() -> None:
    read_fd, write_fd = os.pipe()
    try:
        writer = NonBlockingLineWriter(write_fd)
        writes: list[int] = []
        real = writer._write

        def counting(data: bytes | bytearray) -> int:
            writes.append(len(data))
            return real(data)

        writer._write = counting  # type: ignore[method-assign]

        async def one_pass() -> None:
            for i in range(3):
                writer.write_line(f'{{"n": {i}}}')
            assert writes == []  # nothing written yet: the pass is not over
            await asyncio.sleep(0)

        asyncio.run(one_pass())
        assert len(writes) == 1
        assert os.read(read_fd, 1000) == b'{"n": 0}\n{"n": 1}\n{"n": 2}\n'
        writer.write_line("outside a loop")  # written at once
        assert len(writes) == 2 and os.read(read_fd, 1000) == b"outside a loop\n"
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_per_logger_levels_and_the_console_format() -> None:
    """A real process: `logging.levels` drops one logger's lines below its own level while the
    others keep the global level; `auto` renders JSON when stdout is not a terminal."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = (
        "import structlog\n"
        "from proxy.logs import configure_logging\n"
        "import sys\n"
        "configure_logging('info', sys.argv[1], {'sip700.calls': 'warning', "
        "'sip700.transport': 'debug'})\n"
        "structlog.get_logger('sip700.calls').info('call_info')\n"
        "structlog.get_logger('sip700.calls').warning('call_warning')\n"
        "structlog.get_logger('sip700.transport').debug('transport_debug')\n"
        "structlog.get_logger('sip700').debug('main_debug')\n"
        "structlog.get_logger('sip700').info('main_info')\n"
    )
    for fmt in ("auto", "console"):
        done = subprocess.run([sys.executable, "-c", script, fmt], cwd=root, capture_output=True,
                              text=True, timeout=30, check=True)
        out = done.stdout
        assert "call_info" not in out and "call_warning" in out, out
        assert "transport_debug" in out and "main_debug" not in out and "main_info" in out, out
        lines = out.strip().splitlines()
        if fmt == "auto":  # not a terminal: JSON
            assert all(line.startswith("{") for line in lines), out
        else:  # console, without colours off a terminal
            assert not any(line.startswith("{") for line in lines) and "\x1b[" not in out, out


def test_writer_batches_again_in_a_second_loop() -> None:
    """A flush scheduled on one loop never stands for another: records of a later loop's pass
    go out at the end of that pass too, and none waits forever."""
    read_fd, write_fd = os.pipe()
    try:
        writer = NonBlockingLineWriter(write_fd)

        async def one_pass(tag: str) -> None:
            writer.write_line(f"{tag}1")
            writer.write_line(f"{tag}2")
            await asyncio.sleep(0)

        asyncio.run(one_pass("a"))
        asyncio.run(one_pass("b"))
        assert os.read(read_fd, 1000) == b"a1\na2\nb1\nb2\n"
        assert writer.pending == bytearray()
    finally:
        os.close(read_fd)
        os.close(write_fd)


_FAST_SCRIPT = """
import json, sys
import structlog
from proxy import logs
logs.configure_logging('info', sys.argv[1], {'sip700.quiet': 'warning'})
fast = logs.info_logger('sip700.calls')
fast('call', call_id='abc', x='7001****0001', lookup_ms=0.25, outcome='routed', n=None,
     odd=b'raw')
structlog.get_logger('sip700.calls').info('call', call_id='abc', x='7001****0001',
                                          lookup_ms=0.25, outcome='routed', n=None,
                                          odd=b'raw')
logs.info_logger('sip700.quiet')('call', call_id='dropped')
named = getattr(fast, '__qualname__', '')
print('fast_is_structlog=%s' % named.startswith('BoundLogger'), flush=True)
"""


def test_info_logger_writes_structlog_s_json_line() -> None:
    """The call log's own JSON rendering: the same keys in the same order and the same values
    as structlog's line (its timestamp aside), bytes as their repr; a logger whose level drops
    info writes nothing; the console format is structlog's own."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _FAST_SCRIPT, "json"], cwd=root,
                          capture_output=True, text=True, timeout=30, check=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2, done.stdout  # the quiet logger's line was dropped
    fast, slow = (json.loads(line) for line in lines)
    assert list(fast) == list(slow) == ["call_id", "x", "lookup_ms", "outcome", "n", "odd",
                                        "event", "level", "timestamp"]
    assert {k: v for k, v in fast.items() if k != "timestamp"} == \
        {k: v for k, v in slow.items() if k != "timestamp"}
    assert fast["odd"] == "b'raw'" and fast["level"] == "info"
    import datetime
    import re

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", fast["timestamp"])
    stamps = [datetime.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
              for line in (fast, slow)]
    assert timedelta_s(stamps[1] - stamps[0]) < 2  # the same clock, the same zone
    assert "dropped" not in done.stdout
    console = subprocess.run([sys.executable, "-c", _FAST_SCRIPT, "console"], cwd=root,
                             capture_output=True, text=True, timeout=30, check=True)
    assert "fast_is_structlog=False" in done.stdout
    assert not any(line.startswith("{") for line in console.stdout.splitlines())
    assert console.stdout.count("call") >= 2 and "dropped" not in console.stdout


def timedelta_s(delta: object) -> float:
    return abs(delta.total_seconds())  # type: ignore[attr-defined]


def test_json_call_log_feeds_the_histograms_and_writes_the_line() -> None:
    """The call log's compiled step: each `call` line observes decision_ms and lookup_ms (in
    seconds; a lookup_ms outside 0-600 s means none was made) and counts the outcome, then
    writes the line with event, level and timestamp last; other events are written only."""
    import json

    from proxy import logs
    from proxy.calllog import JsonCallLog
    from proxy.metrics import WorkerMetrics

    lines: list[str] = []
    metrics = WorkerMetrics()
    log = metrics.call_log(JsonCallLog(lines.append, logs._encode))
    assert isinstance(log, JsonCallLog)
    log("call", call_id="a", outcome="routed", lookup_ms=2.5, decision_ms=4.0)
    log("call", call_id="b", outcome="no binding", lookup_ms=-1.0, decision_ms=0.5)
    log("rejected", reason="x", decision_ms=99.0)
    assert metrics.outcomes["routed"] == 1 and metrics.outcomes["no binding"] == 1
    assert sum(metrics.decision.counts) == 2 and abs(metrics.decision.sum - 0.0045) < 1e-12
    assert sum(metrics.lookup.counts) == 1 and metrics.lookup.sum == 0.0025
    first, _second, third = (json.loads(line) for line in lines)
    assert list(first) == ["call_id", "outcome", "lookup_ms", "decision_ms", "event", "level",
                           "timestamp"]
    assert first["event"] == "call" and third["event"] == "rejected"
    assert first["level"] == third["level"] == "info"


def test_a_deferred_record_is_rendered_after_the_pass_in_its_place() -> None:
    """write_later: nothing is rendered while the loop pass runs (the call log's line costs
    the message that logged it nothing before its sends); at the end of the pass the records
    go out in the order they were logged, with write_line's among them, in one write.
    Outside a loop, and on flush, a record is rendered at once."""
    from proxy import linewriter

    read_fd, write_fd = os.pipe()
    try:
        writer = NonBlockingLineWriter(write_fd)
        rendered: list[str] = []

        def render(fields: dict) -> str:
            rendered.append(fields["n"])
            return f'{{"n": "{fields["n"]}"}}'

        async def one_pass() -> None:
            writer.write_later(render, {"n": "a"})
            writer.write_later(render, {"n": "b"})
            assert rendered == [] and writer.records
            writer.write_line('{"n": "c"}')  # an immediate line keeps its place after them
            writer.write_later(render, {"n": "d"})
            assert rendered == ["a", "b"]
            await asyncio.sleep(0)

        asyncio.run(one_pass())
        assert rendered == ["a", "b", "d"] and writer.records == []
        assert os.read(read_fd, 1000) == b'{"n": "a"}\n{"n": "b"}\n{"n": "c"}\n{"n": "d"}\n'
        writer.write_later(render, {"n": "e"})  # no loop: at once
        assert os.read(read_fd, 1000) == b'{"n": "e"}\n'

        async def capped() -> None:
            for i in range(linewriter.MAX_RECORDS + 3):
                writer.write_later(render, {"n": str(i)})
            assert len(writer.records) == linewriter.MAX_RECORDS and writer.dropped == 3
            writer.records = writer.records[:2]  # keep the pipe's reader small
            assert writer.flush()  # flush renders what waits
            assert writer.records == []

        asyncio.run(capped())
        assert os.read(read_fd, 1000) == b'{"n": "0"}\n{"n": "1"}\n'
        writer.records.append((render, {"n": "z"}))
        writer.forget_pending()  # a forked child drops its parent's records
        assert writer.records == [] and writer.flush()
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_the_call_log_hands_its_fields_over_when_it_can_defer() -> None:
    from proxy import logs
    from proxy.calllog import JsonCallLog

    handed: list[tuple] = []
    lines: list[str] = []
    log = JsonCallLog(lines.append, logs._encode,
                      write_later=lambda render, fields: handed.append((render, fields)))
    log("call", call_id="a", outcome="routed")
    assert lines == [] and len(handed) == 1
    render, fields = handed[0]
    assert list(fields) == ["call_id", "outcome", "event", "level", "timestamp"]
    import json

    assert json.loads(render(fields))["call_id"] == "a"
