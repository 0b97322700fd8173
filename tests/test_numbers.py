import pytest

from proxy.numbers import mask_number, mask_numbers_in, normalize_number, number_variants


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("13800000001", "13800000001"),
        ("+8613800000001", "13800000001"),
        ("008613800000001", "13800000001"),
        ("8613800000001", "13800000001"),
        ("+86-138-0000-0001", "13800000001"),
        ("tel:+86.138.0000.0001", "13800000001"),
        ("+86(138)00000001;phone-context=x", "13800000001"),
        ("700100000000001", "700100000000001"),
        ("+86700100000000001", "700100000000001"),
        ("0086700100000000001", "700100000000001"),
        ("86700100000000001", "700100000000001"),
        ("+861012345678", "01012345678"),
        ("01012345678", "01012345678"),
        ("+86 4001234567", "4001234567"),
        ("8612345", "8612345"),  # too short to carry a country code: left alone
    ],
)
def test_normalize_accepts_national_and_international_forms(raw: str, expected: str) -> None:
    assert normalize_number(raw) == expected


@pytest.mark.parametrize("raw", ["", "alice", "+4915112345678", "12", "138abc", "+"])
def test_normalize_rejects_non_numbers(raw: str) -> None:
    assert normalize_number(raw) is None


def test_mask_keeps_only_prefix_and_suffix() -> None:
    assert mask_number("13800005678") == "138****5678"
    assert mask_number("700100000000001") == "700********0001"
    assert mask_number("12345") == "*****"


def test_mask_numbers_in_free_text_leaves_short_digit_runs() -> None:
    text = "bad Call-ID 13800005678-4711@10.0.0.1 and 8613800005678"
    assert mask_numbers_in(text) == "bad Call-ID 138****5678-4711@10.0.0.1 and 861******5678"


def test_variants_cover_wire_forms() -> None:
    assert number_variants("13800000001") == (
        "13800000001", "+8613800000001", "008613800000001", "8613800000001",
    )
    assert number_variants("01012345678")[1] == "+861012345678"
