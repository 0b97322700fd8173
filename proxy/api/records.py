"""From a validated request to a binding record, and from a record to what the API shows.

A record is the binding as the API keeps it (JSON, `x` first so a Lua script can fill in an
allocated X cheaply): the routing fields, the optional fields the proxy carries with each call,
and bookkeeping (tenant, request_id, area, created/updated times, all times in unix ms).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from proxy.bindings.model import AXB, AXN, BOTH, Binding
from proxy.numbers import mask_number, normalize_number

MIN_TTL_S = 60
_MOBILE = re.compile(r"1[3-9][0-9]{9}")
_FIXED = re.compile(r"0[1-9][0-9]{8,10}")
_ID = re.compile(r"[0-9a-f]{32}")


class ApiError(Exception):
    """An answer other than success: HTTP status, error code, the field it is about, message."""

    def __init__(self, status: int, error: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.field = field
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "field": self.field, "message": self.message}


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_field", message, field)


def not_found(what: str = "binding") -> ApiError:
    return ApiError(404, "not_found", f"no such {what}")


def party_number(field: str, text: str) -> str:
    """A or B: a mainland mobile or fixed-line number, in national format."""
    number = normalize_number(text)
    if number is None:
        raise invalid(field, "not a phone number")
    if not (_MOBILE.fullmatch(number) or _FIXED.fullmatch(number)):
        raise invalid(field, f"{mask_number(number)} is not a mainland mobile or fixed-line "
                             "number in national format")
    return number


def is_binding_id(text: str) -> bool:
    return _ID.fullmatch(text) is not None


def new_binding_id() -> str:
    return os.urandom(16).hex()


def expiry_ms(ttl_s: int | None, expires_at: datetime | None, max_ttl_s: int, now: float,
              required: bool = True) -> int | None:
    """The expiry (unix ms) from ttl_s or expires_at, within 60 s .. max_ttl_s from now."""
    if ttl_s is not None and expires_at is not None:
        raise invalid("expires_at", "give ttl_s or expires_at, not both")
    if ttl_s is None and expires_at is None:
        if required:
            raise invalid("ttl_s", "give ttl_s (seconds) or expires_at")
        return None
    if ttl_s is not None:
        if not MIN_TTL_S <= ttl_s <= max_ttl_s:
            raise invalid("ttl_s", f"must be {MIN_TTL_S} .. {max_ttl_s} seconds (api.max_ttl_s)")
        return int((now + ttl_s) * 1000)
    assert expires_at is not None
    seconds = expires_at.timestamp() - now
    if not MIN_TTL_S - 1 <= seconds <= max_ttl_s + 1:
        raise invalid("expires_at", f"must be {MIN_TTL_S} s .. {max_ttl_s} s from now "
                                    "(api.max_ttl_s)")
    return int(expires_at.timestamp() * 1000)


@dataclass(slots=True)
class AuditContext:
    """Who made a change and from where (never the key itself)."""

    key_id: str
    source: str
    request_id: str = ""


def make_record(*, binding_id: str, tenant: str, kind: str, x: str, a: str, b: str | None,
                exp_ms: int, direction: str, area: str | None, max_call_s: int | None,
                out_id: str | None, order_id: str | None, user_data: str | None,
                request_id: str | None, now_ms: int,
                time_window: str | None = None) -> dict[str, Any]:
    """A new record; `x` may be '' until the allocation fills it in."""
    return {"x": x, "id": binding_id, "tenant": tenant, "type": kind, "a": a, "b": b,
            "exp_ms": exp_ms, "direction": direction, "area": area, "max_call_s": max_call_s,
            "out_id": out_id, "order_id": order_id, "user_data": user_data,
            "time_window": time_window, "request_id": request_id, "created_ms": now_ms,
            "updated_ms": now_ms}


def dump_record(record: dict[str, Any]) -> str:
    """Compact JSON with `x` first (the create script replaces `{"x":"",` with the X)."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


def record_binding(record: dict[str, Any]) -> Binding:
    """The Binding a record stands for (what the stores route)."""
    return Binding(record["type"], record["x"], record["a"], record["b"],
                   record["exp_ms"] / 1000.0, id=record["id"], tenant=record["tenant"],
                   direction=record.get("direction") or BOTH,
                   max_call_s=record.get("max_call_s"), out_id=record.get("out_id"),
                   order_id=record.get("order_id"), user_data=record.get("user_data"),
                   time_window=record.get("time_window"))


def _iso(ms: int) -> str:
    """RFC 3339 UTC with milliseconds: 2026-12-02T03:21:43.984Z."""
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def record_out(record: dict[str, Any]) -> dict[str, Any]:
    """The JSON the API answers with for a record."""
    out = {"id": record["id"], "tenant": record["tenant"], "type": record["type"],
           "x": record["x"], "a": record["a"], "b": record["b"],
           "expires_at": _iso(record["exp_ms"]), "direction": record.get("direction") or BOTH}
    for name in ("area", "max_call_s", "out_id", "order_id", "user_data", "time_window",
                 "request_id"):
        if record.get(name) is not None:
            out[name] = record[name]
    out["created_at"] = _iso(record["created_ms"])
    out["updated_at"] = _iso(record["updated_ms"])
    return out


def live(record: dict[str, Any], now: float | None = None) -> bool:
    return record["exp_ms"] > (time.time() if now is None else now) * 1000


__all__ = ["AXB", "AXN"]
