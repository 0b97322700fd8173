"""Reading call records back from the stream: the newest, by Call-ID, by number (support)."""

from __future__ import annotations

from typing import Any

from proxy.numbers import mask_number

NUMBER_FIELDS = ("caller", "callee")


def masked(record: dict[str, str]) -> dict[str, str]:
    """A record with the parties' numbers masked (X is public)."""
    out = dict(record)
    for name in NUMBER_FIELDS:
        if out.get(name):
            out[name] = mask_number(out[name])
    return out


async def latest(client: Any, stream: str, count: int) -> list[tuple[str, dict[str, str]]]:
    """The newest `count` records, oldest first."""
    rows = await client.xrevrange(stream, count=count)
    return list(reversed(rows))


async def find(client: Any, stream: str, *, call_id: str | None = None,
               number: str | None = None, tenant: str | None = None, limit: int = 100,
               scan_max: int = 200_000) -> list[tuple[str, dict[str, str]]]:
    """Records of a Call-ID or of a number (caller, callee or X), newest first, scanning the
    stream backwards at most `scan_max` entries (the stream has no index by number)."""
    out: list[tuple[str, dict[str, str]]] = []
    cursor = "+"
    scanned = 0
    while len(out) < limit and scanned < scan_max:
        rows = await client.xrevrange(stream, max=cursor, count=1000)
        if not rows:
            break
        scanned += len(rows)
        for entry_id, fields in rows:
            if tenant is not None and fields.get("tenant") != tenant:
                continue
            if call_id is not None and fields.get("call_id") != call_id:
                continue
            if number is not None and number not in (fields.get("caller"), fields.get("callee"),
                                                     fields.get("x")):
                continue
            out.append((entry_id, fields))
            if len(out) >= limit:
                break
        cursor = "(" + rows[-1][0]
    return out
