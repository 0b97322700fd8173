"""The support console: server-rendered pages on the API port, under /console.

Log in with an API key (a tenant's key sees its own bindings, an operator key every tenant's);
the session is a signed cookie naming the key id, never the key. Look up a party number, an X
or an order id: the bindings show with A and B masked, with their audit history. Revealing a
binding's numbers is itself an audited action (`reveal`).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import os
import re
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from proxy.api.keys import Principal
from proxy.api.records import ApiError, is_binding_id
from proxy.numbers import mask_number, normalize_number

COOKIE = "sip700_console"
SESSION_S = 8 * 3600
_SECRET_KEY: web.AppKey[bytes] = web.AppKey("sip700_console_secret", bytes)

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;
text-align:left;font-size:.9rem}th{background:#f3f3f3}.muted{color:#777}
form.inline{display:inline}.error{color:#a00}header{display:flex;justify-content:space-between}
"""


def _secret(cfg: Any) -> bytes:
    """Signs session cookies: from the dialog key when there is one (every instance agrees),
    else random for this process."""
    key = cfg.privacy.dialog_key_bytes
    if key is None:
        return os.urandom(32)
    return hashlib.sha256(b"sip700 console session\x00" + key).digest()


def _sign(secret: bytes, text: str) -> str:
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()[:32]


def make_session(secret: bytes, principal: Principal, now: float) -> str:
    body = f"{principal.key_id}.{int(now) + SESSION_S}"
    return f"{body}.{_sign(secret, body)}"


def session_principal(request: web.Request) -> Principal | None:
    from proxy.api.app import APP_STATE

    value = request.cookies.get(COOKIE, "")
    body, _, sig = value.rpartition(".")
    secret = request.app[_SECRET_KEY]
    if not body or not hmac.compare_digest(sig, _sign(secret, body)):
        return None
    key_id, _, expiry = body.partition(".")
    if not expiry.isdigit() or int(expiry) < time.time():
        return None
    return request.app[APP_STATE].keys.by_key_id(key_id)  # a key removed from the config: out


def _page(title: str, body: str, principal: Principal | None = None, status: int = 200
          ) -> web.Response:
    who = ""
    if principal is not None:
        scope = "operator (all tenants)" if principal.tenant is None else (
            f"tenant {html.escape(principal.tenant)}")
        who = (f'<span id="who">{scope} · key {principal.key_id}</span> '
               '<form class="inline" method="post" action="/console/logout">'
               '<button id="logout">Log out</button></form>')
    text = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{title} · sip700"
            f"</title><style>{_STYLE}</style></head><body><header><h1>sip700 support console"
            f"</h1><div>{who}</div></header>{body}</body></html>")
    return web.Response(text=text, content_type="text/html", status=status,
                        headers={"Cache-Control": "no-store",
                                 "Content-Security-Policy": "default-src 'none'; "
                                 "style-src 'unsafe-inline'; form-action 'self'"})


def _when(ms: int | str) -> str:
    return datetime.fromtimestamp(int(ms) / 1000.0, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _masked(number: str | None) -> str:
    return "" if not number else html.escape(mask_number(number))


_SEARCH_FORM = """
<form method="get" action="/console/search" id="search">
  <select name="kind" id="kind">
    <option value="number"{n}>party number (A or B)</option>
    <option value="x"{x}>middle number X</option>
    <option value="order_id"{o}>order id</option>
  </select>
  <input name="q" id="q" value="{q}" size="28" required>
  <button id="lookup">Look up</button>
</form>"""


def _search_form(kind: str = "number", q: str = "") -> str:
    return _SEARCH_FORM.format(n=" selected" if kind == "number" else "",
                               x=" selected" if kind == "x" else "",
                               o=" selected" if kind == "order_id" else "",
                               q=html.escape(q))


def _login(message: str = "", status: int = 200) -> web.Response:
    error = f'<p class="error" id="error">{html.escape(message)}</p>' if message else ""
    return _page("Log in", f"""{error}
<form method="post" action="/console/login" id="login">
  <label>API key <input type="password" name="key" id="key" size="50" required></label>
  <button id="submit">Log in</button>
</form><p class="muted">A tenant's key shows its own bindings; an operator key every
tenant's.</p>""", status=status)


async def index(request: web.Request) -> web.Response:
    principal = session_principal(request)
    if principal is None:
        return _login()
    return _page("Look up", _search_form(), principal)


async def login(request: web.Request) -> web.Response:
    from proxy.api.app import APP_STATE

    form = await request.post()
    key = str(form.get("key", ""))
    principal = request.app[APP_STATE].keys.principal(key.strip())
    if principal is None:
        return _login("That key is not valid.", status=401)
    response = web.HTTPSeeOther("/console")
    response.set_cookie(COOKIE, make_session(request.app[_SECRET_KEY], principal, time.time()),
                        max_age=SESSION_S, httponly=True, samesite="Strict", path="/console")
    raise response


async def logout(request: web.Request) -> web.Response:
    response = web.HTTPSeeOther("/console")
    response.del_cookie(COOKIE, path="/console")
    raise response


def _require(request: web.Request) -> Principal:
    principal = session_principal(request)
    if principal is None:
        raise web.HTTPSeeOther("/console")
    return principal


def _binding_rows(records: list[dict[str, Any]], reveal: bool = True) -> str:
    rows = []
    for r in records:
        button = (f'<form class="inline" method="post" action="/console/reveal">'
                  f'<input type="hidden" name="id" value="{r["id"]}">'
                  f'<button class="reveal">Reveal</button></form>') if reveal else ""
        rows.append(
            f'<tr class="binding" data-id="{r["id"]}"><td><a href="/console/bindings/{r["id"]}">'
            f'{r["id"][:12]}…</a></td><td>{html.escape(r["tenant"])}</td><td>{r["type"]}</td>'
            f'<td class="x">{html.escape(r["x"])}</td><td class="a">{_masked(r["a"])}</td>'
            f'<td class="b">{_masked(r["b"])}</td><td>{html.escape(r.get("direction") or "")}'
            f'</td><td>{html.escape(r.get("order_id") or "")}</td>'
            f'<td>{_when(r["exp_ms"])}</td><td>{button}</td></tr>')
    return ("<table id='results'><tr><th>id</th><th>tenant</th><th>type</th><th>X</th>"
            "<th>A</th><th>B</th><th>direction</th><th>order</th><th>expires</th><th></th>"
            "</tr>" + "".join(rows) + "</table>")


async def search(request: web.Request) -> web.Response:
    from proxy.api.app import APP_STATE

    principal = _require(request)
    state = request.app[APP_STATE]
    kind = request.query.get("kind", "number")
    q = request.query.get("q", "").strip()
    form = _search_form(kind, q)
    if kind not in ("number", "x", "order_id") or not q or len(q) > 128:
        return _page("Look up", form + '<p class="error">Give a number, an X or an order id.'
                     '</p>', principal)
    try:
        if kind == "order_id":
            records = await state.backend.find(state.scope(principal), order_id=q)
        else:
            number = normalize_number(q)
            if number is None:
                return _page("Look up", form + '<p class="error">Not a phone number.</p>',
                             principal)
            kwargs = {"x": number} if kind == "x" else {"number": number}
            records = await state.backend.find(state.scope(principal), **kwargs)
    except ApiError as exc:
        return _page("Look up", form + f'<p class="error">{html.escape(exc.message)}</p>',
                     principal, status=exc.status)
    found = (f"<p id='count'>{len(records)} live binding(s)</p>" + _binding_rows(records)
             if records else "<p id='count'>No live binding.</p>")
    if kind in ("number", "x"):
        found += await _call_records(request, principal, number)
    return _page("Look up", form + found, principal)


def may_reveal_records(cfg: Any, principal: Principal) -> bool:
    """`api.console_reveal_records`: full numbers of call records only for whom the config
    names (none by default); a tenant's key then sees its own tenant's records only."""
    allowed = cfg.api.console_reveal_records
    return allowed == "all" or (allowed == "operators" and principal.is_operator)


_RECORD_CELLS = ("invite_at", "direction", "caller", "x", "callee", "sip_status", "refusal",
                 "release_dir", "talk_s", "tenant")
_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


async def _call_records(request: web.Request, principal: Principal, number: str) -> str:
    """The newest call records of a number (caller, callee or X), numbers masked; a tenant's
    key sees its own tenant's records only. Empty when records are off."""
    client = request.app.get(_RECORDS_KEY)
    if client is None:
        return ""
    from proxy.api.app import APP_STATE
    from proxy.records.reading import find, masked

    cfg = request.app[APP_STATE].cfg
    try:
        rows = await find(client, cfg.records.stream, number=number, tenant=principal.tenant,
                          limit=50, scan_max=cfg.records.search_scan_max)
    except Exception:
        return "<p class='error' id='records-error'>Call records unavailable.</p>"
    reveal = may_reveal_records(cfg, principal)
    body = "".join(
        f"<tr class='record' data-entry='{html.escape(entry_id)}'>" + "".join(
            f"<td class='{c}'>{html.escape(masked(f).get(c, ''))}</td>" for c in _RECORD_CELLS)
        + ("<td><form class='inline' method='post' action='/console/records/reveal'>"
           f"<input type='hidden' name='entry' value='{html.escape(entry_id)}'>"
           "<button class='reveal-record'>Reveal</button></form></td>" if reveal else "")
        + "</tr>" for entry_id, f in rows)
    head = "".join(f"<th>{c}</th>" for c in _RECORD_CELLS) + ("<th></th>" if reveal else "")
    return (f"<h2>Call records</h2><p id='records-count'>{len(rows)} record(s)</p>"
            f"<table id='records'><tr>{head}</tr>{body}</table>")


async def reveal_record(request: web.Request) -> web.Response:
    """One call record with its numbers in full: only with `api.console_reveal_records`, and
    only once the reveal is in the audit trail (`action: reveal_record`)."""
    from proxy.api.app import APP_STATE

    principal = _require(request)
    state = request.app[APP_STATE]
    if not may_reveal_records(state.cfg, principal):
        return _page("Not allowed", "<p class='error' id='error'>This key may not reveal "
                     "call records (api.console_reveal_records).</p>", principal, 403)
    form = await request.post()
    entry_id = str(form.get("entry", ""))
    client = request.app.get(_RECORDS_KEY)
    if client is None or not _ENTRY_ID.fullmatch(entry_id):
        return _page("Not found", "<p class='error'>No such call record.</p>", principal, 404)
    try:
        rows = await client.xrange(state.cfg.records.stream, entry_id, entry_id)
    except Exception:
        return _page("Unavailable", "<p class='error'>Call records unavailable.</p>",
                     principal, 503)
    record = rows[0][1] if rows else None
    if record is None or (principal.tenant is not None
                          and record.get("tenant") != principal.tenant):
        return _page("Not found", "<p class='error'>No such call record.</p>", principal, 404)
    if state.audit is None:
        return _page("Unavailable", "<p class='error'>No audit trail: cannot reveal.</p>",
                     principal, 503)
    binding_id = record.get("binding_id", "")
    try:
        await state.audit.append({"action": "reveal_record", "tenant": record.get("tenant", ""),
                                  "key": principal.key_id, "src": request.remote or "",
                                  "rid": "", "record_id": record.get("record_id", ""),
                                  "before": "", "after": ""},
                                 binding_id if is_binding_id(binding_id) else "")
    except Exception:
        return _page("Unavailable", "<p class='error'>The audit trail cannot be written: "
                     "numbers stay hidden.</p>", principal, 503)
    cells = ("record_id", "invite_at", "direction", "x", "caller", "callee", "sip_status",
             "refusal", "release_dir", "talk_s", "tenant", "binding_id", "order_id")
    body = ("<p>Revealed (this is recorded in the audit trail).</p><table id='revealed'><tr>"
            + "".join(f"<th>{c}</th>" for c in cells) + "</tr><tr>"
            + "".join(f"<td class='{c}'>{html.escape(record.get(c, ''))}</td>" for c in cells)
            + "</tr></table><p><a href='/console'>back</a></p>")
    return _page("Revealed", body, principal)


async def _visible(request: web.Request, principal: Principal, binding_id: str
                   ) -> dict[str, Any] | None:
    from proxy.api.app import APP_STATE

    if not is_binding_id(binding_id):
        return None
    record = await request.app[APP_STATE].backend.get(binding_id)
    if record is None or (principal.tenant is not None and record["tenant"] != principal.tenant):
        return None
    return record


def _parties(rec: Any) -> str:
    if not isinstance(rec, dict) or not rec.get("exp_ms"):
        return ""
    return f"{_masked(rec.get('a'))} ↔ {_masked(rec.get('b'))} until {_when(rec['exp_ms'])}"


def _history(entries: list[dict[str, Any]]) -> str:
    rows = []
    parties = _parties
    for e in entries:
        rows.append(f"<tr class='audit'><td>{_when(e['t'])}</td><td class='action'>"
                    f"{html.escape(e.get('action', ''))}</td><td>{html.escape(e.get('key', ''))}"
                    f"</td><td>{html.escape(e.get('src', ''))}</td>"
                    f"<td>{parties(e.get('before'))}</td><td>{parties(e.get('after'))}</td></tr>")
    return ("<h2>History</h2><table id='history'><tr><th>time</th><th>action</th><th>key id"
            "</th><th>source</th><th>before</th><th>after</th></tr>" + "".join(rows)
            + "</table>")


async def binding_page(request: web.Request) -> web.Response:
    from proxy.api.app import APP_STATE

    principal = _require(request)
    binding_id = request.match_info["id"]
    record = await _visible(request, principal, binding_id)
    if record is None:
        return _page("Not found", _search_form() + "<p class='error'>No such binding.</p>",
                     principal, status=404)
    audit = request.app[APP_STATE].audit
    entries = await audit.history(binding_id) if audit is not None else []
    return _page("Binding", _search_form() + _binding_rows([record]) + _history(entries),
                 principal)


async def reveal(request: web.Request) -> web.Response:
    from proxy.api.app import APP_STATE

    principal = _require(request)
    form = await request.post()
    binding_id = str(form.get("id", ""))
    record = await _visible(request, principal, binding_id)
    if record is None:
        return _page("Not found", "<p class='error'>No such binding.</p>", principal, 404)
    audit = request.app[APP_STATE].audit
    if audit is None:
        return _page("Unavailable", "<p class='error'>No audit trail: cannot reveal.</p>",
                     principal, 503)
    try:
        await audit.append({"action": "reveal", "tenant": record["tenant"],
                            "key": principal.key_id, "src": request.remote or "", "rid": "",
                            "before": "", "after": ""}, binding_id)
    except Exception:
        return _page("Unavailable", "<p class='error'>The audit trail cannot be written: "
                     "numbers stay hidden.</p>", principal, 503)
    body = (f"<p>Revealed (this is recorded in the audit trail).</p><table id='revealed'>"
            f"<tr><th>X</th><th>A</th><th>B</th></tr><tr><td>{html.escape(record['x'])}</td>"
            f"<td class='a'>{html.escape(record['a'])}</td>"
            f"<td class='b'>{html.escape(record['b'] or '')}</td></tr></table>"
            f"<p><a href='/console/bindings/{binding_id}'>back</a></p>")
    return _page("Revealed", body, principal)


_RECORDS_KEY: web.AppKey[Any] = web.AppKey("sip700_console_records", object)


def add_console(app: web.Application) -> None:
    from proxy.api.app import APP_STATE

    cfg = app[APP_STATE].cfg
    app[_SECRET_KEY] = _secret(cfg)
    records = getattr(cfg, "records", None)
    if records is not None and records.enabled:  # the call records of a looked-up number
        import redis.asyncio as aioredis

        from proxy.records.writer import records_url

        app[_RECORDS_KEY] = aioredis.Redis.from_url(records_url(cfg), decode_responses=True,
                                                    socket_timeout=2.0,
                                                    socket_connect_timeout=1.0)

        async def close_records(app: web.Application) -> None:
            await app[_RECORDS_KEY].aclose()

        app.on_cleanup.append(close_records)
    app.router.add_get("/console", index)
    app.router.add_post("/console/login", login)
    app.router.add_post("/console/logout", logout)
    app.router.add_get("/console/search", search)
    app.router.add_get("/console/bindings/{id}", binding_page)
    app.router.add_post("/console/reveal", reveal)
    app.router.add_post("/console/records/reveal", reveal_record)


__all__ = ["add_console", "json"]
