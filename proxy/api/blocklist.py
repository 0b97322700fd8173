"""The call policy's blocklists through the API (the same Redis sets as `sip700 block`).

GET /v1/blocklist[?tenant=ID], POST /v1/blocklist {kind, value[, tenant]},
DELETE /v1/blocklist/{kind}/{value}[?tenant=ID]. A tenant's key sees and changes its own list
only; an operator's key the global list, or a tenant's with `tenant`. Every change goes to the
audit stream; every worker applies it within policy.blocklist_poll_ms (1 s at most).
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from proxy.api.app import APP_STATE, ApiState, authenticate, context, parse_body
from proxy.api.keys import Principal
from proxy.api.records import ApiError, invalid, not_found
from proxy.api.schemas import BlockEntry
from proxy.policy.blocklist import BadEntry, parse_entry
from proxy.policy.blocklist_store import BlocklistStore
from proxy.policy.spec import policy_key_prefix, policy_redis_url

BLOCKLISTS: web.AppKey[BlocklistStore] = web.AppKey("sip700_blocklists", object)  # type: ignore[arg-type]


def _scope(state: ApiState, principal: Principal, asked: str | None, field: str) -> str | None:
    """The list a request is about: the tenant's own, or (operator) the global / a tenant's."""
    if principal.tenant is not None:
        if asked is not None and asked != principal.tenant:
            raise ApiError(403, "forbidden", "a tenant's key manages its own blocklist only",
                           field)
        return principal.tenant
    if asked is not None and asked not in state.tenant_ids:
        raise invalid(field, "no such tenant")
    return asked


def _entry(kind: str, value: str) -> str:
    try:
        return parse_entry(kind, value)
    except BadEntry as exc:
        raise invalid("kind" if "kind" in str(exc) else "value", str(exc)) from None


async def _audit(request: web.Request, state: ApiState, principal: Principal, action: str,
                 tenant: str | None, entry: str) -> None:
    ctx = context(request, principal)
    await state.audit.append({"action": action, "tenant": tenant or "", "key": ctx.key_id,
                              "src": ctx.source, "rid": ctx.request_id,
                              "after": json.dumps({"entry": entry})})


def _store(request: web.Request) -> BlocklistStore:
    return request.app[BLOCKLISTS]


@web.middleware
async def redis_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """The policy's Redis unreachable: 503, like the binding store's."""
    try:
        return await handler(request)
    except (RedisError, OSError):
        if not request.path.startswith("/v1/blocklist"):
            raise
        raise ApiError(503, "unavailable", "the policy's Redis is unavailable; try again",
                       headers={"Retry-After": "1"}) from None


async def list_entries(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    principal = authenticate(request, state)
    tenant = _scope(state, principal, request.query.get("tenant"), "tenant")
    entries = await _store(request).entries(tenant)
    return web.json_response({"tenant": tenant, "entries": entries})


async def add_entry(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    principal = authenticate(request, state)
    req: BlockEntry = await parse_body(request, BlockEntry)
    tenant = _scope(state, principal, req.tenant, "tenant")
    entry = _entry(req.kind, req.value)
    added = await _store(request).add(tenant, entry)
    if added:
        await _audit(request, state, principal, "block_add", tenant, entry)
    return web.json_response({"tenant": tenant, "entry": entry}, status=201 if added else 200)


async def remove_entry(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    principal = authenticate(request, state)
    tenant = _scope(state, principal, request.query.get("tenant"), "tenant")
    entry = _entry(request.match_info["kind"], request.match_info["value"])
    if not await _store(request).remove(tenant, entry):
        raise not_found("blocklist entry")
    await _audit(request, state, principal, "block_remove", tenant, entry)
    return web.Response(status=204)


def add_routes(app: web.Application, cfg: Any) -> None:
    client = aioredis.Redis.from_url(policy_redis_url(cfg), decode_responses=True,
                                     socket_timeout=2.0, socket_connect_timeout=2.0)
    app[BLOCKLISTS] = BlocklistStore(client, policy_key_prefix(cfg))

    async def close(app: web.Application) -> None:
        await client.aclose()

    app.on_cleanup.append(close)
    app.middlewares.append(redis_errors)
    app.router.add_get("/v1/blocklist", list_entries)
    app.router.add_post("/v1/blocklist", add_entry)
    app.router.add_delete("/v1/blocklist/{kind}/{value}", remove_entry)
