"""MemoryStore: AXB/AXN routing, uniqueness, expiry on read, unbind, listing."""

import time

import pytest

from proxy.bindings.memory import MemoryStore
from proxy.bindings.model import AXB, AXN, Binding, BindingConflict, Outcome, resolve_among

X = "700100000000001"
X2 = "700100000000002"
A, B, C, D = "13800000001", "13900000001", "13700000001", "13600000001"
NOW = 1_000_000.0


def store_with(*bindings: Binding) -> MemoryStore:
    store = MemoryStore()
    for binding in bindings:
        store.bind_now(binding, NOW)
    return store


def test_axb_routes_both_ways_and_refuses_others() -> None:
    store = store_with(Binding(AXB, X, A, B, NOW + 60))
    assert store.resolve_cached(X, A, NOW).callee == B
    assert store.resolve_cached(X, B, NOW).callee == A
    assert store.resolve_cached(X, C, NOW).outcome is Outcome.NOT_PARTY
    assert store.resolve_cached(X2, A, NOW).outcome is Outcome.NO_BINDING


def test_resolution_carries_binding_expiry() -> None:
    store = store_with(Binding(AXB, X, A, B, NOW + 60))
    assert store.resolve_cached(X, A, NOW).expires_at == NOW + 60


def test_lookup_normalises_caller_and_x() -> None:
    store = store_with(Binding(AXB, X, A, B, NOW + 60))
    assert store.resolve_cached("+86" + X, "+8613800000001", NOW).callee == B
    assert store.resolve_cached(X, "008613900000001", NOW).callee == A


def test_axn_routes_anyone_to_a_and_a_to_default() -> None:
    store = store_with(Binding(AXN, X, A, B, NOW + 60), Binding(AXN, X2, C, None, NOW + 60))
    assert store.resolve_cached(X, D, NOW).callee == A
    assert store.resolve_cached(X, A, NOW).callee == B
    assert store.resolve_cached(X2, D, NOW).callee == C
    assert store.resolve_cached(X2, C, NOW).outcome is Outcome.NOT_PARTY


def test_expired_binding_never_routes() -> None:
    store = store_with(Binding(AXB, X, A, B, NOW + 10), Binding(AXN, X2, C, None, NOW + 10))
    later = NOW + 10
    assert store.resolve_cached(X, A, later).outcome is Outcome.NO_BINDING
    assert store.resolve_cached(X2, D, later).outcome is Outcome.NO_BINDING
    assert len(store) == 0  # purged, not only hidden


def test_not_party_only_while_some_binding_on_x_is_live() -> None:
    store = store_with(Binding(AXB, X, A, B, NOW + 10), Binding(AXB, X, C, D, NOW + 20))
    assert store.resolve_cached(X, "13500000001", NOW + 15).outcome is Outcome.NOT_PARTY
    assert store.resolve_cached(X, A, NOW + 15).outcome is Outcome.NOT_PARTY
    assert store.resolve_cached(X, C, NOW + 15).callee == D
    assert store.resolve_cached(X, C, NOW + 20).outcome is Outcome.NO_BINDING


def test_uniqueness_per_x() -> None:
    store = store_with(Binding(AXB, X, A, B, NOW + 60))
    store.bind_now(Binding(AXB, X, C, D, NOW + 60), NOW)  # AXB and CXD share X
    store.bind_now(Binding(AXB, X2, B, C, NOW + 60), NOW)  # B on another X is fine
    with pytest.raises(BindingConflict):
        store.bind_now(Binding(AXB, X, B, "13500000001", NOW + 60), NOW)
    with pytest.raises(BindingConflict):
        store.bind_now(Binding(AXN, X, "13500000001", None, NOW + 60), NOW)
    assert store.resolve_cached(X, B, NOW).callee == A  # the refused binding changed nothing


def test_axn_x_refuses_axb() -> None:
    store = store_with(Binding(AXN, X, A, None, NOW + 60))
    with pytest.raises(BindingConflict):
        store.bind_now(Binding(AXB, X, C, D, NOW + 60), NOW)
    with pytest.raises(BindingConflict):
        store.bind_now(Binding(AXN, X, C, None, NOW + 60), NOW)


def test_renewal_replaces_expiry_and_default() -> None:
    store = store_with(Binding(AXB, X, A, B, NOW + 10), Binding(AXN, X2, C, None, NOW + 10))
    assert store.bind_now(Binding(AXB, X, B, A, NOW + 100), NOW) is False
    assert store.bind_now(Binding(AXN, X2, C, D, NOW + 100), NOW) is False
    assert store.bind_now(Binding(AXB, X, C, D, NOW + 100), NOW) is True
    assert store.resolve_cached(X, A, NOW + 50).callee == B
    assert store.resolve_cached(X2, C, NOW + 50).callee == D
    assert len(store) == 3


def test_party_of_expired_binding_may_bind_again() -> None:
    store = store_with(Binding(AXB, X, A, B, NOW + 10))
    store.bind_now(Binding(AXB, X, B, C, NOW + 100), NOW + 11)
    assert store.resolve_cached(X, B, NOW + 12).callee == C
    assert store.resolve_cached(X, A, NOW + 12).outcome is Outcome.NOT_PARTY


def test_unbind_by_either_party() -> None:
    store = store_with(Binding(AXB, X, A, B, NOW + 60), Binding(AXB, X, C, D, NOW + 60))
    assert store.unbind_now(X, "+8613900000001", NOW) is True
    assert store.resolve_cached(X, A, NOW).outcome is Outcome.NOT_PARTY
    assert store.unbind_now(X, A, NOW) is False
    assert store.unbind_now(X, D, NOW) is True
    assert store.resolve_cached(X, C, NOW).outcome is Outcome.NO_BINDING


def test_unbind_axn_by_owner() -> None:
    store = store_with(Binding(AXN, X, A, B, NOW + 60))
    assert store.unbind_now(X, B, NOW) is False  # the default number is not a party
    assert store.unbind_now(X, A, NOW) is True
    assert store.resolve_cached(X, C, NOW).outcome is Outcome.NO_BINDING


async def test_async_api_matches_sync() -> None:
    store = MemoryStore()
    binding = Binding(AXB, X, A, B, time.time() + 60)
    await store.bind(binding)
    assert (await store.resolve(X, A)).callee == B
    assert await store.get(X) == [binding]
    assert await store.list(x_prefix="7001") == [binding]
    assert await store.list(x_prefix="7002") == []
    assert await store.unbind(X, A) is True
    assert await store.get(X) == []
    await store.close()


def test_store_agrees_with_reference_semantics() -> None:
    bindings = [Binding(AXB, X, A, B, NOW + 10), Binding(AXB, X, C, D, NOW + 30)]
    store = store_with(*bindings)
    for at in (NOW, NOW + 10, NOW + 29, NOW + 30):
        for caller in (A, B, C, D, "13500000001"):
            expected = resolve_among(bindings, caller, at)
            got = store.resolve_cached(X, caller, at)
            assert (got.outcome, got.callee) == (expected.outcome, expected.callee)


def _lookup_faults_in_a_child(store: MemoryStore, calls: list[tuple[str, str]],
                              own_pages: bool) -> tuple[int, int]:
    """(answers own_pages touched, minor page faults of the lookups) in a forked child, as
    a worker forked from the supervisor would see them."""
    import json
    import os
    import resource

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once
        try:
            touched = store.own_pages() if own_pages else 0
            for x, a in calls:  # the calls' own shared pages, written by the refcounts here,
                del x, a  # are copied now: only the store's pages count below
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            routed = sum(1 for x, a in calls if store.resolve_cached(x, a, NOW).callee)
            after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            os.write(write_fd, json.dumps([touched, after - before, routed]).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        touched, faults, routed = json.loads(f.read())
    os.waitpid(pid, 0)
    assert routed == len(calls)
    return touched, faults


def test_a_forked_worker_copies_the_answers_pages_before_its_calls() -> None:
    """Shared copy-on-write after the fork, every answer a lookup returns has its reference
    count written: without own_pages the calls themselves take the page faults."""
    import gc

    store = MemoryStore()
    n = 20_000
    for i in range(n):
        store.bind_now(Binding(AXB, f"7001{i % 500:011d}", f"138{i:08d}", f"139{i:08d}",
                               NOW + 3600), NOW)
    gc.collect()
    gc.freeze()  # as the supervisor does: the collector leaves the shared pages alone
    try:
        calls = [(f"7001{i % 500:011d}", f"138{i:08d}") for i in range(0, n, 7)]
        _, shared_faults = _lookup_faults_in_a_child(store, calls, own_pages=False)
        touched, own_faults = _lookup_faults_in_a_child(store, calls, own_pages=True)
    finally:
        gc.unfreeze()
    assert touched == 2 * n  # each AXB binding answers its two parties
    assert shared_faults > 100, shared_faults  # the calls copied pages one fault at a time
    assert own_faults < shared_faults / 10, (own_faults, shared_faults)
