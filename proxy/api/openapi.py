"""The OpenAPI 3.1 document, made from the pydantic models that validate the requests."""

from __future__ import annotations

import functools
from typing import Any

from pydantic.json_schema import models_json_schema

from proxy.api.schemas import (
    BindingList,
    BindingOut,
    BlockEntry,
    CreateBinding,
    ErrorOut,
    Health,
    UpdateBinding,
)

_MODELS = (CreateBinding, UpdateBinding, BlockEntry, BindingOut, BindingList, ErrorOut,
           Health)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*codes: int) -> dict[str, Any]:
    words = {400: "body is not JSON", 401: "no valid API key", 403: "operator keys are "
             "read-only", 404: "no such binding (or another tenant's)", 409: "conflict: no "
             "free X, x taken, a party already bound", 413: "body too large", 415: "not JSON",
             422: "invalid or unknown field", 429: "over the tenant's rate (Retry-After)",
             503: "binding store unavailable"}
    return {str(c): _json("ErrorOut", words[c]) for c in codes}


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The whole document (built once)."""
    _, schemas = models_json_schema([(m, "validation") for m in _MODELS[:3]]
                                    + [(m, "serialization") for m in _MODELS[3:]],
                                    ref_template="#/components/schemas/{model}")
    binding_id = {"name": "id", "in": "path", "required": True,
                  "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}
    common = (401, 429, 503)
    tenant_param = {"name": "tenant", "in": "query", "required": False,
                    "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "sip700 binding API", "version": "1"},
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/bindings": {
                "post": {
                    "operationId": "createBinding",
                    "summary": "Create a binding (allocating X from your pool when x is absent)",
                    "requestBody": {"required": True, "content": {
                        "application/json": {"schema": _ref("CreateBinding")}}},
                    "responses": {"201": _json("BindingOut", "created"),
                                  "200": _json("BindingOut", "the binding an earlier request "
                                                             "with this request_id created"),
                                  **_errors(400, 403, 409, 413, 415, 422, *common)},
                },
                "get": {
                    "operationId": "findBindings",
                    "summary": "Live bindings with a party number, on an X, or for an order "
                               "(exactly one of number, x, order_id)",
                    "parameters": [
                        {"name": n, "in": "query", "required": False,
                         "schema": {"type": "string"}} for n in ("number", "x", "order_id")
                    ] + [{"name": "limit", "in": "query", "required": False,
                          "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
                    "responses": {"200": _json("BindingList", "the bindings"),
                                  **_errors(422, *common)},
                },
            },
            "/v1/bindings/{id}": {
                "parameters": [binding_id],
                "get": {"operationId": "getBinding", "summary": "One binding",
                        "responses": {"200": _json("BindingOut", "the binding"),
                                      **_errors(404, *common)}},
                "patch": {
                    "operationId": "updateBinding",
                    "summary": "Change expiry, A or B, direction or out_id",
                    "requestBody": {"required": True, "content": {
                        "application/json": {"schema": _ref("UpdateBinding")}}},
                    "responses": {"200": _json("BindingOut", "the binding as changed"),
                                  **_errors(400, 403, 404, 409, 413, 415, 422, *common)},
                },
                "delete": {
                    "operationId": "deleteBinding",
                    "summary": "Remove a binding: new calls stop, calls in progress go on",
                    "responses": {"204": {"description": "deleted"},
                                  **_errors(403, 404, 409, *common)},
                },
            },
            "/v1/blocklist": {
                "get": {
                    "operationId": "listBlocklist",
                    "summary": "The call policy's blocklist: yours (tenant key), the global one "
                               "or a tenant's (operator key, ?tenant=)",
                    "parameters": [tenant_param],
                    "responses": {"200": {"description": "{tenant, entries: [kind:value]}"},
                                  **_errors(403, 422, *common)},
                },
                "post": {
                    "operationId": "addBlocklistEntry",
                    "summary": "Refuse calls of a number (caller, callee, x) or of a prefix",
                    "requestBody": {"required": True, "content": {
                        "application/json": {"schema": _ref("BlockEntry")}}},
                    "responses": {"201": {"description": "added: {tenant, entry}"},
                                  "200": {"description": "already on the list"},
                                  **_errors(400, 403, 413, 415, 422, *common)},
                },
            },
            "/v1/blocklist/{kind}/{value}": {
                "parameters": [
                    {"name": "kind", "in": "path", "required": True,
                     "schema": {"enum": ["caller", "callee", "x", "prefix"]}},
                    {"name": "value", "in": "path", "required": True,
                     "schema": {"type": "string"}}, tenant_param],
                "delete": {"operationId": "removeBlocklistEntry",
                           "summary": "Take an entry off the list",
                           "responses": {"204": {"description": "removed"},
                                         **_errors(403, 404, 422, *common)}},
            },
            "/healthz": {"get": {"operationId": "health", "security": [],
                                 "responses": {"200": _json("Health", "the process is up")}}},
            "/readyz": {"get": {"operationId": "ready", "security": [],
                                "responses": {"200": _json("Health", "the store answers"),
                                              "503": _json("Health", "the store does not")}}},
        },
    }
