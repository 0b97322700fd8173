"""MemoryStore against the reference semantics (model.resolve_among / check_conflict)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.bindings.memory import MemoryStore
from proxy.bindings.model import (
    AXB,
    Binding,
    BindingConflict,
    check_conflict,
    resolve_among,
)

XS = ["700100000000001", "700100000000002"]
NUMBERS = [f"1380000000{i}" for i in range(5)]

ops = st.lists(
    st.tuples(
        st.sampled_from(["axb", "axn", "unbind", "wait"]),
        st.sampled_from(XS),
        st.sampled_from(NUMBERS),
        st.sampled_from([*NUMBERS, None]),
        st.integers(min_value=1, max_value=30),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_memory_store_matches_reference(sequence: list) -> None:
    store = MemoryStore()
    model: list[Binding] = []
    now = 1000.0
    for op, x, a, b, n in sequence:
        if op == "wait":
            now += n
        elif op == "unbind":
            live = [m for m in model if m.x == x and m.is_live(now) and a in m.parties()]
            assert store.unbind_now(x, a, now) is bool(live)
            model = [m for m in model if m not in live]
        else:
            if a == b or (op == AXB and b is None):
                continue
            binding = Binding(op, x, a, b, now + n)
            try:
                replaced = check_conflict([m for m in model if m.x == x], binding, now)
            except BindingConflict:
                try:
                    store.bind_now(binding, now)
                except BindingConflict:
                    pass
                else:
                    raise AssertionError(f"store accepted {binding}") from None
            else:
                store.bind_now(binding, now)
                model = [m for m in model if m not in replaced and m.is_live(now)] + [binding]
        for x_ in XS:
            on_x = [m for m in model if m.x == x_]
            for caller in NUMBERS:
                expected = resolve_among(on_x, caller, now)
                got = store.resolve_cached(x_, caller, now)
                assert (got.outcome, got.callee) == (expected.outcome, expected.callee)
        assert sorted(store.get_now(XS[0], now), key=repr) == sorted(
            (m for m in model if m.x == XS[0] and m.is_live(now)), key=repr
        )
