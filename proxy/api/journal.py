"""The memory store with several workers: the API (in worker 0) writes each change to a journal
file in the run's private directory, and every other worker applies it within 100 ms.

A worker that starts (or restarts) replays the whole journal first, so all workers hold the
same bindings; lines are appended whole by one writer and read up to the last newline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import structlog

from proxy.api.records import record_binding
from proxy.bindings.model import BindingConflict, InvalidBinding

log = structlog.get_logger("sip700.api")
POLL_S = 0.1


class Journal:
    """Append-only change log: one JSON object a line, {"put": record} or {"del": record},
    with "old": the record replaced (its binding is unbound first)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def append(self, change: dict[str, Any]) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(self._fd, (json.dumps(change, separators=(",", ":")) + "\n").encode())

    def read_from(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        """Complete lines after `offset`, and the offset after them."""
        try:
            with self.path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return [], offset
        end = data.rfind(b"\n") + 1
        changes = [json.loads(line) for line in data[:end].splitlines() if line]
        return changes, offset + end

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def apply_change(store: Any, change: dict[str, Any], now: float) -> None:
    """Apply one journal line to a memory store."""
    for key in ("old", "del"):
        old = change.get(key)
        if old:
            store.unbind_now(old["x"], old["a"], now)
    new = change.get("put")
    if new and new["exp_ms"] > now * 1000:
        try:
            store.bind_now(record_binding(new), now)
        except (BindingConflict, InvalidBinding) as exc:  # cannot happen with one writer
            log.error("journal_apply_failed", binding_id=new.get("id"), error=str(exc))


class JournalFollower:
    """A worker's task: apply what the API's worker appends."""

    def __init__(self, journal: Journal, store: Any) -> None:
        self.journal = journal
        self.store = store
        self.offset = 0
        self._task: asyncio.Task[None] | None = None

    def catch_up(self, now: float) -> int:
        changes, self.offset = self.journal.read_from(self.offset)
        for change in changes:
            apply_change(self.store, change, now)
        return len(changes)

    def start(self) -> None:
        import time

        self.catch_up(time.time())
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        import time

        while True:
            await asyncio.sleep(POLL_S)
            try:
                self.catch_up(time.time())
            except Exception:  # a bad line must not stop the worker
                log.exception("journal_follow_failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
