"""One-way AXB bindings and the optional fields a call's Resolution carries (model and memory
store; the Redis store's equivalents are in tests/integration/test_redis_store.py)."""

import pytest

from proxy.bindings.files import read_bindings
from proxy.bindings.memory import MemoryStore
from proxy.bindings.model import (
    A_TO_B,
    AXB,
    AXN,
    B_TO_A,
    Binding,
    InvalidBinding,
    Outcome,
    make_binding,
    resolve_among,
)

X = "700100000000001"
A, B, C = "13800000001", "13900000001", "13700000001"
NOW = 1_000_000.0
META = {"id": "b1", "tenant": "shop1", "max_call_s": 600, "out_id": "o-1", "order_id": "ord-9",
        "user_data": "{\"k\": 1}"}


def one_way(direction: str) -> Binding:
    return Binding(AXB, X, A, B, NOW + 60, direction=direction, **META)


@pytest.mark.parametrize(("direction", "allowed", "refused"),
                         [(A_TO_B, A, B), (B_TO_A, B, A)])
def test_one_way_binding_refuses_the_other_direction(direction: str, allowed: str,
                                                     refused: str) -> None:
    store = MemoryStore()
    store.bind_now(one_way(direction), NOW)
    for answer in (store.resolve_cached(X, allowed, NOW),
                   resolve_among([one_way(direction)], allowed, NOW)):
        assert answer.outcome is Outcome.ROUTE and answer.callee == (B if allowed == A else A)
    for answer in (store.resolve_cached(X, refused, NOW),
                   resolve_among([one_way(direction)], refused, NOW)):
        assert answer.outcome is Outcome.DIRECTION_RESTRICTED and answer.callee is None
        assert answer.binding_id == "b1" and answer.direction == direction
    assert store.resolve_cached(X, C, NOW).outcome is Outcome.NOT_PARTY


def test_resolution_carries_the_binding_fields() -> None:
    store = MemoryStore()
    store.bind_now(Binding(AXB, X, A, B, NOW + 60, **META), NOW)
    answer = store.resolve_cached(X, A, NOW)
    assert (answer.binding_id, answer.tenant, answer.max_call_s, answer.out_id,
            answer.order_id, answer.user_data, answer.direction) == (
        "b1", "shop1", 600, "o-1", "ord-9", "{\"k\": 1}", "both")
    assert resolve_among(store.get_now(X, NOW), B, NOW) == store.resolve_cached(X, B, NOW)


def test_one_way_binding_can_be_unbound_from_either_party_and_renewed() -> None:
    store = MemoryStore()
    store.bind_now(one_way(A_TO_B), NOW)
    assert store.unbind_now(X, B, NOW)
    assert store.resolve_cached(X, A, NOW).outcome is Outcome.NO_BINDING
    store.bind_now(one_way(A_TO_B), NOW)
    assert store.bind_now(Binding(AXB, X, B, A, NOW + 90), NOW) is False  # a renewal, swapped
    assert store.resolve_cached(X, A, NOW).outcome is Outcome.ROUTE


def test_plain_resolutions_keep_their_old_shape() -> None:
    answer = resolve_among([Binding(AXB, X, A, B, NOW + 60)], A, NOW)
    assert answer.binding_id is None and answer.direction == "both" and answer.tenant is None


@pytest.mark.parametrize(("optional", "message"), [
    ({"direction": "sideways"}, "direction"),
    ({"max_call_s": "ten"}, "max_call_s"),
    ({"max_call_s": 0}, "max_call_s"),
    ({"out_id": "x" * 129}, "out_id"),
    ({"colour": "red"}, "unknown field"),
    ({"time_window": "8:00-22:00"}, "time_window"),
    ({"time_window": "08:00-24:00"}, "time_window"),
    ({"time_window": "08:00-08:00"}, "same time"),
    ({"time_window": "08:00-22:00 Mars/Olympus"}, "unknown time zone"),
])
def test_bad_optional_fields_are_refused(optional: dict, message: str) -> None:
    with pytest.raises(InvalidBinding, match=message):
        make_binding(AXB, X, A, B, 60, NOW, **optional)


def test_axn_has_no_direction() -> None:
    with pytest.raises(InvalidBinding, match="axn"):
        make_binding(AXN, X, A, None, 60, NOW, direction=A_TO_B)


def test_bindings_file_accepts_the_optional_fields(tmp_path) -> None:
    path = tmp_path / "bindings.yaml"
    path.write_text(
        "bindings:\n"
        f'  - {{type: axb, x: "{X}", a: "{A}", b: "{B}", ttl: 60}}\n'
        f'  - {{type: axb, x: "700100000000002", a: "{A}", b: "{B}", ttl: 60, '
        'direction: a_to_b, max_call_s: 300, out_id: o1, order_id: "ord-1", tenant: shop1, '
        'id: abc, user_data: "hello"}\n')
    rows = [item for item in read_bindings(path, NOW)]
    assert len(rows) == 2
    _, second = rows[1]
    assert (second.direction, second.max_call_s, second.out_id, second.order_id,
            second.tenant, second.id, second.user_data) == (
        "a_to_b", 300, "o1", "ord-1", "shop1", "abc", "hello")
    csv = tmp_path / "bindings.csv"
    csv.write_text(f"type,x,a,b,ttl,direction,order_id\naxb,{X},{A},{B},60,b_to_a,o7\n")
    [(_, binding)] = list(read_bindings(csv, NOW))
    assert (binding.direction, binding.order_id) == ("b_to_a", "o7")
    store = MemoryStore()
    loaded, problems = store.load_file(path, NOW)
    assert (loaded, problems) == (2, [])
    assert store.resolve_cached("700100000000002", B, NOW).outcome is Outcome.DIRECTION_RESTRICTED


def test_a_time_window_travels_with_the_binding_to_the_resolution(tmp_path) -> None:
    from proxy.bindings.model import resolution_from_meta
    from proxy.bindings.redis_store import meta_value, parse_meta_value

    binding = make_binding(AXB, X, A, B, 60, NOW, time_window=" 08:00-22:00 Europe/Berlin ")
    assert binding.time_window == "08:00-22:00 Europe/Berlin"
    assert resolve_among([binding], A, NOW).time_window == "08:00-22:00 Europe/Berlin"
    # the Redis store's form: the optional fields in the X hash, back into a Resolution
    meta = parse_meta_value(meta_value(binding))
    assert resolution_from_meta(Outcome.ROUTE, B, NOW + 60, meta).time_window == (
        "08:00-22:00 Europe/Berlin")
    path = tmp_path / "bindings.yaml"
    path.write_text("bindings:\n"
                    f'  - {{type: axb, x: "{X}", a: "{A}", b: "{B}", ttl: 60, '
                    'time_window: "22:00-06:00"}\n')
    [(_, loaded)] = list(read_bindings(path, NOW))
    assert loaded.time_window == "22:00-06:00"
