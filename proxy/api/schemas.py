"""Request and response bodies of the binding API.

The same pydantic models validate requests and make the OpenAPI document (`openapi.py`), so
the two cannot disagree. Unknown fields are refused; types are strict (no "60" for 60).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
)

_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
Number = Annotated[StrictStr, Field(min_length=1, max_length=32,
                                    description="national, +86, 0086 or with separators")]
Text128 = Annotated[StrictStr, Field(max_length=128, pattern=_PRINTABLE)]
Direction = Literal["both", "a_to_b", "b_to_a"]


def _time_window(value: str) -> str:
    from proxy.bindings.model import InvalidBinding, check_time_window

    try:
        return check_time_window(value)
    except InvalidBinding as exc:
        raise ValueError(str(exc)) from None


TimeWindowText = Annotated[StrictStr, Field(max_length=64), AfterValidator(_time_window)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateBinding(_Body):
    """POST /v1/bindings. Give `ttl_s` or `expires_at`; without `x`, one is allocated."""

    type: Literal["axb", "axn"] = "axb"
    a: Number
    b: Number | None = None
    x: Number | None = Field(default=None, description="a number of your pool; none: allocate")
    area: Annotated[StrictStr, Field(pattern=r"^0[0-9]{2,3}$")] | None = Field(
        default=None, description="preferred area code of the allocated X, e.g. 010")
    area_match: Literal["strict", "fallback"] = Field(
        default="fallback", description="strict: 409 when no X of `area` is free")
    ttl_s: Annotated[StrictInt, Field(ge=60)] | None = Field(
        default=None, description="life in seconds, 60 .. api.max_ttl_s")
    expires_at: AwareDatetime | None = None
    direction: Direction = "both"
    max_call_s: Annotated[StrictInt, Field(ge=1, le=86400)] | None = None
    out_id: Text128 | None = None
    order_id: Annotated[StrictStr, Field(min_length=1, max_length=128,
                                         pattern=_PRINTABLE)] | None = None
    user_data: Annotated[StrictStr, Field(max_length=1024, pattern=_PRINTABLE)] | None = None
    time_window: TimeWindowText | None = Field(
        default=None, description="calls only between two local times, e.g. '08:00-22:00' "
        "(Asia/Shanghai) or '08:00-22:00 Europe/Berlin'; end before start spans midnight")
    request_id: Annotated[StrictStr, Field(min_length=1, max_length=128,
                                           pattern=r"^[\x21-\x7e]+$")] | None = Field(
        default=None, description="retries with the same request_id get the same binding")


class UpdateBinding(_Body):
    """PATCH /v1/bindings/{id}: a new expiry, A or B, direction or out_id (at least one)."""

    a: Number | None = None
    b: Number | None = None
    ttl_s: Annotated[StrictInt, Field(ge=60)] | None = Field(
        default=None, description="new life in seconds from now")
    expires_at: AwareDatetime | None = None
    direction: Direction | None = None
    out_id: Text128 | None = None


class BindingOut(BaseModel):
    """A binding as the API shows it."""

    id: str
    tenant: str
    type: Literal["axb", "axn"]
    x: str
    a: str
    b: str | None = None
    expires_at: datetime
    direction: Direction = "both"
    area: str | None = None
    max_call_s: int | None = None
    out_id: str | None = None
    order_id: str | None = None
    user_data: str | None = None
    time_window: str | None = None
    request_id: str | None = None
    created_at: datetime
    updated_at: datetime


class BindingList(BaseModel):
    bindings: list[BindingOut]


class ErrorOut(BaseModel):
    """Every error: a code, the request field it is about (if any), and a sentence."""

    error: str
    field: str | None = None
    message: str


class Health(BaseModel):
    status: str


class BlockEntry(_Body):
    """POST /v1/blocklist: refuse calls of a number (as caller, callee or X) or of a prefix.
    A tenant's key changes its own list; an operator's the global one, or a tenant's."""

    kind: Literal["caller", "callee", "x", "prefix"]
    value: Annotated[StrictStr, Field(min_length=1, max_length=32)]
    tenant: Annotated[StrictStr, Field(max_length=32)] | None = None
