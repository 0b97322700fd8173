"""Bindings: the AXB/AXN model, the store interface, the memory and Redis stores."""

from proxy.bindings.model import (
    AXB,
    AXN,
    Binding,
    BindingConflict,
    InvalidBinding,
    Outcome,
    Resolution,
    StoreUnavailable,
    make_binding,
)
from proxy.bindings.store import BindingStore, open_store

__all__ = [
    "AXB",
    "AXN",
    "Binding",
    "BindingConflict",
    "BindingStore",
    "InvalidBinding",
    "Outcome",
    "Resolution",
    "StoreUnavailable",
    "make_binding",
    "open_store",
]
