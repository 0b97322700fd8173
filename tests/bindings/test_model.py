"""The binding model: validation, normalisation, reference resolution, conflicts."""

import pytest

from proxy.bindings.model import (
    AXB,
    AXN,
    Binding,
    BindingConflict,
    InvalidBinding,
    Outcome,
    check_conflict,
    make_binding,
    resolve_among,
    validate_binding,
)

X = "700100000000001"
A, B, C = "13800000001", "13900000001", "13700000001"


def test_make_binding_normalises_every_number() -> None:
    binding = make_binding(
        "AXB", "+86700100000000001", "+8613800000001", "0086-139-0000-0001", 60, 1000.0
    )
    assert binding == Binding(AXB, X, A, B, 1060.0)


@pytest.mark.parametrize(
    ("kind", "x", "a", "b", "ttl", "message"),
    [
        ("axc", X, A, B, 60, "unknown binding type"),
        ("axb", X, "not-a-number", B, 60, "a "),
        ("axb", X, A, None, 60, "needs b"),
        ("axb", X, A, "+8613800000001", 60, "same number"),
        ("axb", X, X, B, 60, "itself"),
        ("axb", X, A, B, 0, "positive"),
        ("axb", X, A, B, "soon", "not a number"),
    ],
)
def test_make_binding_rejects(
    kind: str, x: str, a: str, b: str | None, ttl: object, message: str
) -> None:
    with pytest.raises(InvalidBinding, match=message):
        make_binding(kind, x, a, b, ttl, 0.0)  # type: ignore[arg-type]


def test_invalid_number_is_masked_in_the_error() -> None:
    with pytest.raises(InvalidBinding) as info:
        make_binding("axb", X, "1380000000123456789x", B, 60, 0.0)
    assert "1380000000123456789" not in str(info.value)


def test_validate_binding_keeps_normal_bindings_identical() -> None:
    binding = Binding(AXB, X, A, B, 5.0)
    assert validate_binding(binding) is binding
    assert validate_binding(Binding(AXN, X, "+8613800000001", None, 5.0)).a == A


def test_resolve_among_axb() -> None:
    bindings = [Binding(AXB, X, A, B, 100.0)]
    assert resolve_among(bindings, A, 50.0).callee == B
    assert resolve_among(bindings, B, 50.0).callee == A
    assert resolve_among(bindings, C, 50.0).outcome is Outcome.NOT_PARTY
    assert resolve_among(bindings, A, 100.0).outcome is Outcome.NO_BINDING  # expired
    assert resolve_among([], A, 0.0).outcome is Outcome.NO_BINDING


def test_resolve_among_axn() -> None:
    with_default = [Binding(AXN, X, A, B, 100.0)]
    without = [Binding(AXN, X, A, None, 100.0)]
    assert resolve_among(with_default, C, 1.0).callee == A
    assert resolve_among(with_default, A, 1.0).callee == B
    assert resolve_among(without, A, 1.0).outcome is Outcome.NOT_PARTY
    assert resolve_among(without, C, 1.0).outcome is Outcome.ROUTE


def test_check_conflict_rules() -> None:
    axb = Binding(AXB, X, A, B, 100.0)
    other_pair = Binding(AXB, X, "13600000001", "13500000001", 100.0)
    assert check_conflict([axb], other_pair, 1.0) == []
    assert check_conflict([axb], Binding(AXB, X, B, A, 200.0), 1.0) == [axb]  # renewal
    with pytest.raises(BindingConflict):
        check_conflict([axb], Binding(AXB, X, B, C, 100.0), 1.0)
    with pytest.raises(BindingConflict):
        check_conflict([axb], Binding(AXN, X, C, None, 100.0), 1.0)
    with pytest.raises(BindingConflict):
        check_conflict([Binding(AXN, X, C, None, 100.0)], axb, 1.0)
    assert check_conflict([axb], Binding(AXB, X, B, C, 100.0), 100.0) == []  # old one expired
