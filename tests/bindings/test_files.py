"""Binding files: the fast line parser, the generic YAML fallback, CSV, and bad rows."""

from pathlib import Path

import pytest

from proxy.bindings import files
from proxy.bindings.files import Problem, read_bindings
from proxy.bindings.memory import MemoryStore
from proxy.bindings.model import AXB, AXN, Binding, Outcome

NOW = 1_000_000.0
X = "700100000000001"

FAST = """\
# bindings for the lab
bindings:
  - {type: axb, x: "700100000000001", a: "13800000001", b: "13900000001", ttl: 3600}
  - {type: axn, x: "700100000000002", a: "13800000002", ttl: 60}
  - {type: axn, x: 700100000000003, a: 13800000003, b: null, ttl: 60}
  - {x: "700100000000004", type: axb, a: "+8613800000004", b: '0086 139 0000 0004', ttl: 10}
  - {type: axb, x: "700100000000005", a: "not a number", b: "13900000005", ttl: 60}
  - {type: axc, x: "700100000000006", a: "13800000006", b: "13900000006", ttl: 60}
  - {type: axb, x: "700100000000001", a: "13900000001", b: "13700000001", ttl: 60}
  - {type: axb, x: "700100000000007", a: "13800000007", ttl: 60}
  - {type: axb, x: "700100000000008", a: "13800000008", b: "13900000008"}
  - {type: axb, x: "700100000000009", a: "13800000009", b: "13900000009", ttl: 60, tll: 5}
  - {type: axb, x: "700100000000010", a: "13800000010", b: "13900000010", ttl: 60}
"""

GENERIC = """\
bindings:
  - type: axb
    x: "700100000000001"
    a: "13800000001"
    b: "13900000001"
    ttl: 3600
  - {type: axn, x: "700100000000002", a: "13800000002", ttl: 60}
  - type: axb
    x: "700100000000003"
    a: "13800000003"
    ttl: 60
  - just a string
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_fast_path_is_taken_for_the_line_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_generic(*_args: object) -> None:
        raise AssertionError("generic YAML parser used")

    monkeypatch.setattr(files, "_generic_yaml_rows", no_generic)
    store = MemoryStore()
    loaded, problems = store.load_file(write(tmp_path, "b.yaml", FAST), NOW)
    assert loaded == 5
    assert [(p.line, p.message.split(" ")[0]) for p in problems] == [
        (7, "a"),
        (8, "unknown"),
        (9, "a"),  # 13900000001 is already party to the binding on line 3
        (10, "an"),
        (11, "missing"),
        (12, "unknown"),
    ]
    assert all(str(p).startswith(str(tmp_path / "b.yaml") + ":") for p in problems)
    assert "13900000001" not in " ".join(map(str, problems))  # no clear numbers in reports
    assert store.resolve_cached(X, "13800000001", NOW).callee == "13900000001"
    assert store.resolve_cached("700100000000002", "13700000000", NOW).callee == "13800000002"
    assert store.resolve_cached("700100000000003", "13800000003", NOW).outcome is Outcome.NOT_PARTY
    assert store.resolve_cached("700100000000004", "13900000004", NOW).callee == "13800000004"
    assert store.resolve_cached("700100000000004", "13900000004", NOW + 10).callee is None
    assert store.resolve_cached("700100000000010", "13800000010", NOW).callee == "13900000010"


def test_fast_and_generic_paths_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "b.yaml", FAST)
    fast = list(read_bindings(path, NOW))
    monkeypatch.setattr(files, "_fast_yaml_rows", lambda *_args: None)
    generic = list(read_bindings(path, NOW))
    assert fast == generic


def test_generic_yaml_fallback_keeps_line_numbers(tmp_path: Path) -> None:
    items = list(read_bindings(write(tmp_path, "b.yaml", GENERIC), NOW))
    assert items[0] == (2, Binding(AXB, X, "13800000001", "13900000001", NOW + 3600))
    assert items[1] == (7, Binding(AXN, "700100000000002", "13800000002", None, NOW + 60))
    assert isinstance(items[2], Problem) and items[2].line == 8 and "needs b" in items[2].message
    assert isinstance(items[3], Problem) and items[3].line == 12


def test_yaml_syntax_error_is_reported_with_line(tmp_path: Path) -> None:
    items = list(
        read_bindings(write(tmp_path, "b.yaml", "bindings:\n  - {type: axb\n  x: ]\n"), NOW)
    )
    assert len(items) == 1 and isinstance(items[0], Problem) and items[0].line >= 2


def test_missing_bindings_key(tmp_path: Path) -> None:
    items = list(read_bindings(write(tmp_path, "b.yaml", "trunks: []\n"), NOW))
    assert len(items) == 1 and "no 'bindings'" in items[0].message  # type: ignore[union-attr]


def test_odd_lines_in_fast_form(tmp_path: Path) -> None:
    text = (
        "bindings:\n"
        '  - {type: axb, x: "700100000000001", a: "13800000001", b: "139 0000 0001", ttl: 1}\n'
        '  - {"type": axb, x: "700100000000002", a: "13800000001", b: "13900000001", ttl: 1}\n'
    )
    items = list(read_bindings(write(tmp_path, "b.yaml", text), NOW))
    assert items == [
        (2, Binding(AXB, X, "13800000001", "13900000001", NOW + 1)),
        (3, Binding(AXB, "700100000000002", "13800000001", "13900000001", NOW + 1)),
    ]


def test_csv_with_header_and_semicolons(tmp_path: Path) -> None:
    comma = (
        "type,x,a,b,ttl\n"
        "axb,700100000000001,13800000001,13900000001,60\n"
        "axn,700100000000002,13800000002,,60\n"
        "bad,1,2,3,4\n"
    )
    semi = "axb;700100000000001;13800000001;13900000001;60\n"
    items = list(read_bindings(write(tmp_path, "b.csv", comma), NOW))
    assert items[0] == (2, Binding(AXB, X, "13800000001", "13900000001", NOW + 60))
    assert items[1] == (3, Binding(AXN, "700100000000002", "13800000002", None, NOW + 60))
    assert isinstance(items[2], Problem) and items[2].line == 4
    assert list(read_bindings(write(tmp_path, "c.csv", semi), NOW)) == [(1, items[0][1])]  # type: ignore[index]


def test_big_file_loads_every_row(tmp_path: Path) -> None:
    lines = ["bindings:"]
    for i in range(20_000):
        lines.append(
            f'  - {{type: axb, x: "7001{i % 100:011d}", a: "138{i:08d}", b: "139{i:08d}", ttl: 60}}'
        )
    store = MemoryStore()
    loaded, problems = store.load_file(write(tmp_path, "big.yaml", "\n".join(lines)), NOW)
    assert (loaded, problems) == (20_000, [])
    assert store.resolve_cached("700100000000042", "13900019942", NOW).callee == "13800019942"


def test_line_numbers_survive_comments_blank_lines_and_crlf(tmp_path: Path) -> None:
    line = '  - {type: axb, x: "700100000000001", a: "13800000001", b: "13900000001", ttl: 60}'
    other = '  - {type: axb, x: "700100000000002", a: "13800000001", b: "13900000001", ttl: 60}'
    text = "\n".join(["# head", "", "bindings:", line, "  # note", "", other, "  - oops", ""])
    for name, content in (("lf.yaml", text), ("crlf.yaml", text.replace("\n", "\r\n"))):
        items = list(read_bindings(write(tmp_path, name, content), NOW))
        assert [i[0] if isinstance(i, tuple) else i.line for i in items] == [4, 7, 8], name
