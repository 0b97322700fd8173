"""HTTP handlers of the binding API (aiohttp): authentication, tenant isolation, validation,
rate limits, and the mapping of every outcome to a status and a JSON body.

Another tenant's binding answers 404 exactly like a missing one (no probing of ids).
Operator keys read every tenant's bindings; only tenant keys change them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from proxy.api.keys import KeyRing, Principal
from proxy.api.openapi import openapi_document
from proxy.api.pools import Pools
from proxy.api.ratelimit import RateLimiter
from proxy.api.records import (
    ApiError,
    AuditContext,
    expiry_ms,
    invalid,
    is_binding_id,
    make_record,
    new_binding_id,
    not_found,
    party_number,
    record_out,
)
from proxy.api.schemas import CreateBinding, UpdateBinding
from proxy.bindings.model import AXB, AXN, BOTH
from proxy.numbers import normalize_number

log = structlog.get_logger("sip700.api")
MAX_BODY_BYTES = 16 * 1024
_RETRIES = 5
APP_STATE: web.AppKey[ApiState] = web.AppKey("sip700_api", object)  # type: ignore[arg-type]


class ApiState:
    """What the handlers share: the config, keys, pools, limits and the backend."""

    def __init__(self, cfg: Any, backend: Any, audit: Any) -> None:
        self.cfg = cfg
        self.backend = backend
        self.audit = audit
        self.keys = KeyRing(cfg)
        self.pools = Pools(cfg)
        self.limiter = RateLimiter({t.id: float(t.rate_limit_per_s) for t in cfg.tenants})
        self.tenant_ids = [t.id for t in cfg.tenants]
        self.middle = cfg.middle_number_regex

    def scope(self, principal: Principal) -> list[str]:
        """The tenants a principal may see."""
        return self.tenant_ids if principal.tenant is None else [principal.tenant]


def error_response(exc: ApiError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error a client sees is {error, field, message}."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        return error_response(ApiError(413, "too_large", f"body over {MAX_BODY_BYTES} bytes"))
    except web.HTTPException as exc:
        if exc.status < 400 or request.path.startswith("/console"):
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        return web.json_response({"error": code, "field": None, "message": exc.reason},
                                 status=exc.status, headers={
                                     k: v for k, v in exc.headers.items() if k == "Allow"})
    except Exception as exc:  # a bug costs one request, never the process; no numbers logged
        log.error("api_internal_error", error=type(exc).__name__, path=request.path,
                  method=request.method)
        return web.json_response({"error": "internal_error", "field": None,
                                  "message": "internal error"}, status=500)


def authenticate(request: web.Request, state: ApiState) -> Principal:
    principal = state.keys.from_authorization(request.headers.get("Authorization"))
    if principal is None:
        raise ApiError(401, "unauthorized", "a valid API key is required: "
                                            "Authorization: Bearer KEY",
                       headers={"WWW-Authenticate": 'Bearer realm="sip700"'})
    if principal.tenant is not None:
        wait = state.limiter.check(principal.tenant)
        if wait > 0:
            raise ApiError(429, "rate_limited", "over this tenant's rate_limit_per_s",
                           headers={"Retry-After": RateLimiter.retry_after(wait)})
    return principal


def tenant_only(principal: Principal) -> str:
    if principal.tenant is None:
        raise ApiError(403, "forbidden", "operator keys read bindings; a tenant's key changes "
                                         "them")
    return principal.tenant


def context(request: web.Request, principal: Principal, request_id: str | None = None
            ) -> AuditContext:
    rid = request_id or request.headers.get("X-Request-Id", "")[:128] or uuid.uuid4().hex
    return AuditContext(principal.key_id, request.remote or "", rid)


async def parse_body(request: web.Request, model: type[BaseModel]) -> Any:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send JSON (Content-Type: "
                                                      "application/json)")
    body = await request.read()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> ApiError:
    """The first problem pydantic found, as {error, field, message}."""
    error = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in error["loc"]) or None
    kind = error["type"]
    if kind == "json_invalid":
        return ApiError(400, "invalid_json", "the body is not valid JSON")
    if kind == "model_type":
        return ApiError(422, "invalid_body", "the body must be a JSON object")
    if kind == "extra_forbidden":
        return ApiError(422, "unknown_field", f"unknown field {field!r}", field)
    if kind == "missing":
        return ApiError(422, "missing_field", f"{field} is required", field)
    return ApiError(422, "invalid_field", error["msg"], field)


def middle_number(state: ApiState, field: str, text: str, tenant: str) -> tuple[str, str]:
    """A middle number of the tenant's pool → (number, area tag)."""
    x = normalize_number(text)
    if x is None or not state.middle.search(x):
        raise invalid(field, "not a middle number")
    owner = state.pools.owner(x)
    if owner is None or owner[0] != tenant:
        raise invalid(field, "not a number of your pool")
    return x, owner[1]


# -- handlers ---------------------------------------------------------------------------------


async def create_binding(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    principal = authenticate(request, state)
    tenant = tenant_only(principal)
    req: CreateBinding = await parse_body(request, CreateBinding)
    cfg = state.cfg
    now = time.time()
    a = party_number("a", req.a)
    b = party_number("b", req.b) if req.b is not None else None
    if req.type == AXB and b is None:
        raise invalid("b", "an axb binding needs b")
    if a == b:
        raise invalid("b", "a and b are the same number")
    if req.type == AXN and req.direction != BOTH:
        raise invalid("direction", "an axn binding has no direction (only 'both')")
    exp = expiry_ms(req.ttl_s, req.expires_at, cfg.api.max_ttl_s, now)
    if cfg.api.require_order_id and req.order_id is None:
        raise invalid("order_id", "required (api.require_order_id: 700 numbers are bound per "
                                  "order)")
    strict = req.area_match == "strict"
    if req.x is not None:
        x, tag = middle_number(state, "x", req.x, tenant)
        tags = [tag]
    else:
        x = ""
        tags = state.pools.search_order(tenant, req.area, strict)
    record = make_record(binding_id=new_binding_id(), tenant=tenant, kind=req.type, x=x, a=a,
                         b=b, exp_ms=exp, direction=req.direction, area=req.area,
                         max_call_s=req.max_call_s, out_id=req.out_id, order_id=req.order_id,
                         user_data=req.user_data, request_id=req.request_id,
                         now_ms=int(now * 1000), time_window=req.time_window)
    created, stored = await state.backend.create(
        record, tags, context(request, principal, req.request_id), strict)
    return web.json_response(record_out(stored), status=201 if created else 200)


async def _owned(state: ApiState, principal: Principal, binding_id: str
                 ) -> tuple[str, dict[str, Any]]:
    """The record (as stored, and parsed) if this principal may see it; 404 otherwise."""
    if not is_binding_id(binding_id):
        raise not_found()
    text = await state.backend.get_raw(binding_id)
    if text is None:
        raise not_found()
    record = json.loads(text)
    if principal.tenant is not None and record["tenant"] != principal.tenant:
        raise not_found()
    if record["exp_ms"] <= time.time() * 1000:
        raise not_found()
    return text, record


async def get_binding(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    principal = authenticate(request, state)
    _, record = await _owned(state, principal, request.match_info["id"])
    return web.json_response(record_out(record))


async def update_binding(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    principal = authenticate(request, state)
    tenant_only(principal)
    binding_id = request.match_info["id"]
    req: UpdateBinding = await parse_body(request, UpdateBinding)
    if not req.model_fields_set:
        raise ApiError(422, "empty_update", "give at least one of a, b, ttl_s, expires_at, "
                                            "direction, out_id")
    a = party_number("a", req.a) if req.a is not None else None
    b = party_number("b", req.b) if req.b is not None else None
    ctx = context(request, principal)
    for _ in range(_RETRIES):
        text, record = await _owned(state, principal, binding_id)
        now = time.time()
        new = dict(record)
        if a is not None:
            new["a"] = a
        if b is not None:
            new["b"] = b
        if new["type"] == AXB and new["a"] == new["b"]:
            raise invalid("b" if b is not None else "a", "a and b are the same number")
        exp = expiry_ms(req.ttl_s, req.expires_at, state.cfg.api.max_ttl_s, now,
                        required=False)
        if exp is not None:
            new["exp_ms"] = exp
        if req.direction is not None:
            if new["type"] == AXN and req.direction != BOTH:
                raise invalid("direction", "an axn binding has no direction (only 'both')")
            new["direction"] = req.direction
        if "out_id" in req.model_fields_set:
            new["out_id"] = req.out_id
        new["updated_ms"] = int(now * 1000)
        stored = await state.backend.change(text, record, new, ctx)
        if stored is not None:
            return web.json_response(record_out(stored))
    raise ApiError(409, "busy", "the binding kept changing; try again")


async def delete_binding(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    principal = authenticate(request, state)
    tenant_only(principal)
    ctx = context(request, principal)
    for _ in range(_RETRIES):
        text, record = await _owned(state, principal, request.match_info["id"])
        if await state.backend.change(text, record, None, ctx) is not None:
            return web.Response(status=204)
    raise ApiError(409, "busy", "the binding kept changing; try again")


async def list_bindings(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    principal = authenticate(request, state)
    query = request.query
    given = [name for name in ("number", "x", "order_id") if name in query]
    unknown = [name for name in query if name not in ("number", "x", "order_id", "limit")]
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown query parameter {unknown[0]!r}",
                       unknown[0])
    if len(given) != 1:
        raise ApiError(422, "missing_field", "give exactly one of number, x, order_id",
                       given[1] if given else "number")
    limit = 100
    if "limit" in query:
        if not query["limit"].isdigit() or not 1 <= int(query["limit"]) <= 1000:
            raise invalid("limit", "must be 1 .. 1000")
        limit = int(query["limit"])
    name = given[0]
    value = query[name]
    if name == "order_id":
        if not value or len(value) > 128:
            raise invalid("order_id", "must be 1 .. 128 characters")
        records = await state.backend.find(state.scope(principal), order_id=value, limit=limit)
    else:
        number = normalize_number(value)
        if number is None:
            raise invalid(name, "not a phone number")
        kwargs = {"x": number} if name == "x" else {"number": number}
        records = await state.backend.find(state.scope(principal), limit=limit, **kwargs)
    records.sort(key=lambda r: (r["created_ms"], r["id"]))
    return web.json_response({"bindings": [record_out(r) for r in records]})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready = await request.app[APP_STATE].backend.ready()
    return web.json_response({"status": "ready" if ready else "store unavailable"},
                             status=200 if ready else 503)


def build_app(cfg: Any, backend: Any, audit: Any) -> web.Application:
    """The aiohttp application: API routes, OpenAPI, health, and the support console."""
    from proxy.api.console import add_console

    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY_BYTES)
    app[APP_STATE] = ApiState(cfg, backend, audit)
    app.router.add_post("/v1/bindings", create_binding)
    app.router.add_get("/v1/bindings", list_bindings)
    app.router.add_get("/v1/bindings/{id}", get_binding)
    app.router.add_patch("/v1/bindings/{id}", update_binding)
    app.router.add_delete("/v1/bindings/{id}", delete_binding)
    from proxy.api.blocklist import add_routes as add_blocklist_routes

    add_blocklist_routes(app, cfg)  # the call policy's blocklists
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_console(app)
    return app
