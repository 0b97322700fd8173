"""API keys: made once, shown once, stored only as `sha256:<hex>` in the config.

A key identifies its tenant (or an operator, who sees every tenant). What logs and the audit
trail record is the key id: the first 12 hex digits of its hash, never the key.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

KEY_PREFIX = "s7k_"


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The form the config keeps: `sha256:<64 hex digits>`."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def key_id(key_hash: str) -> str:
    """What logs and the audit trail show of a key: a prefix of its hash."""
    return key_hash.removeprefix("sha256:")[:12]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a tenant's key, or an operator key (tenant None: every tenant)."""

    tenant: str | None
    key_id: str

    @property
    def is_operator(self) -> bool:
        return self.tenant is None


class KeyRing:
    """The configured key hashes, looked up by the hash of the key presented."""

    def __init__(self, cfg: Any) -> None:
        self._by_hash: dict[str, Principal] = {}
        for key_hash in cfg.operator_keys:
            self._by_hash[key_hash] = Principal(None, key_id(key_hash))
        for tenant in cfg.tenants:
            for key_hash in tenant.api_keys:
                self._by_hash[key_hash] = Principal(tenant.id, key_id(key_hash))

    def principal(self, key: str) -> Principal | None:
        """The principal of a presented key, or None when it is not configured."""
        if not key or len(key) > 256:
            return None
        return self._by_hash.get(hash_key(key))

    def from_authorization(self, header: str | None) -> Principal | None:
        """`Authorization: Bearer KEY` → its principal, or None."""
        if not header:
            return None
        scheme, _, key = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.principal(key.strip())

    def by_key_id(self, wanted: str) -> Principal | None:
        """The principal whose key id this is (for a console session), if still configured."""
        for principal in self._by_hash.values():
            if principal.key_id == wanted:
                return principal
        return None
