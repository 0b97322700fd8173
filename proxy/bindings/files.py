"""Reading binding files: the YAML `bindings:` list and CSV, with line numbers for every row.

A generic YAML parse of 100,000 bindings takes about 10 s, so the common one-flow-mapping-per-line
form is read with a line parser; any file (or line) it does not recognise goes through
`yaml` with the C loader instead. Rows come out raw; `row_to_binding` validates them.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from proxy.bindings.model import OPTIONAL_FIELDS, Binding, InvalidBinding, make_binding

try:
    _YamlLoader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml missing
    _YamlLoader = yaml.SafeLoader

FIELDS = ("type", "x", "a", "b", "ttl")
_FIELD_SET = frozenset(FIELDS) | frozenset(OPTIONAL_FIELDS)
_NULLS = frozenset({"", "~", "null", "Null", "NULL"})

# The form bench and export tools write, keys in this order, quotes optional: one regex match.
# Only [ \t] as blanks: with re.M, \s could run across line ends and shift line numbers.
_CANONICAL_LINE = re.compile(
    r'^[ \t]*-[ \t]*\{[ \t]*type:[ \t]*"?(?P<type>ax[bn])"?[ \t]*,'
    r'[ \t]*x:[ \t]*"?(?P<x>[0-9]+)"?[ \t]*,'
    r'[ \t]*a:[ \t]*"?(?P<a>[0-9]+)"?[ \t]*,'
    r'(?:[ \t]*b:[ \t]*(?:"(?P<b>[0-9]*)"|(?P<bare_b>[0-9]+)|null|~)[ \t]*,)?'
    r"[ \t]*ttl:[ \t]*(?P<ttl>[0-9]+)[ \t]*\}[ \t]*$",
    re.MULTILINE,
)
_ITEM_LINE = re.compile(r"^\s*-\s*\{(?P<body>.*)\}\s*(?:#.*)?$")
_HEADER_LINE = re.compile(r"^bindings:\s*(?:#.*)?$")
_SKIP_LINE = re.compile(r"^\s*(?:#.*)?$|^---\s*$")
_PLAIN_SCALAR = re.compile(r"^[\w+.\-:]*$")  # safe to take verbatim from a flow mapping


@dataclass(frozen=True, slots=True)
class Problem:
    """A row that was skipped, and why."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 µs, and there are 10^5 of these
class Row:
    """One binding as written in a file, not yet validated."""

    line: int
    fields: dict[str, object] | tuple[str | None, ...]  # tuple: (type, x, a, b, bare_b, ttl)


def read_rows(path: Path | str) -> Iterator[Row | Problem]:
    """Rows of a binding file (YAML, or CSV by its .csv/.txt suffix), in file order."""
    path = Path(path)
    if path.suffix.lower() in (".csv", ".txt"):
        yield from read_csv_rows(path)
    else:
        yield from read_yaml_rows(path)


def read_yaml_rows(path: Path) -> Iterator[Row | Problem]:
    """Rows of a YAML bindings file: the fast line form when the whole file is in it."""
    text = path.read_text(encoding="utf-8")
    rows = _fast_yaml_rows(str(path), text)
    if rows is None:
        rows = _generic_yaml_rows(str(path), text)
    yield from rows


def _fast_yaml_rows(name: str, text: str) -> list[Row | Problem] | None:
    """Rows of a file made only of `bindings:` and `- {k: v, ...}` lines; None for anything else.

    One regex scan over the whole text picks the canonical lines; only what lies between two
    of them (comments, other key orders, odd lines) is looked at line by line.
    """
    out: list[Row | Problem] = []
    state = {"header": False}
    pos = 0
    line = 1  # line number at `pos`
    for m in _CANONICAL_LINE.finditer(text):
        start = m.start()
        if start == pos + 1 and text[pos] == "\n":
            line += 1  # the usual case: the next line is canonical too
        elif start > pos:
            gap = text[pos:start]
            if not _gap_rows(name, gap, line, state, out):
                return None
            line += gap.count("\n")
        if not state["header"]:
            return None
        out.append(Row(line, m.group("type", "x", "a", "b", "bare_b", "ttl")))
        pos = m.end()
    if pos < len(text) and not _gap_rows(name, text[pos:], line, state, out):
        return None
    return out if state["header"] else None


def _gap_rows(
    name: str, gap: str, first_line: int, state: dict[str, bool], out: list[Row | Problem]
) -> bool:
    """Lines between canonical ones, one by one; False if the file is not in the fast form."""
    for number, line in enumerate(gap.split("\n"), start=first_line):
        m = _ITEM_LINE.match(line)
        if m is not None and state["header"]:
            fields = _split_flow_mapping(m.group("body"))
            if fields is None:
                fields = _yaml_line(line)
            if isinstance(fields, dict):
                out.append(Row(number, fields))
            else:
                out.append(Problem(name, number, "not a mapping of binding fields"))
        elif _SKIP_LINE.match(line):
            continue
        elif not state["header"] and _HEADER_LINE.match(line):
            state["header"] = True
        else:
            return False
    return True


def _split_flow_mapping(body: str) -> dict[str, object] | None:
    """`type: axb, x: "700…", …` → dict of strings; None if it needs a real YAML parser."""
    fields: dict[str, object] = {}
    for part in body.split(","):
        key, colon, value = part.partition(":")
        if not colon:
            return None
        key = key.strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
            if '"' in value or "'" in value or "\\" in value:
                return None
            fields[key] = value
        elif _PLAIN_SCALAR.match(value):
            fields[key] = None if value in _NULLS else value
        else:
            return None
        if not key.isidentifier():
            return None
    return fields


def _yaml_line(line: str) -> object:
    try:
        loaded = yaml.load(line, Loader=_YamlLoader)
    except yaml.YAMLError:
        return None
    if isinstance(loaded, list) and len(loaded) == 1:
        return loaded[0]
    return None


def _generic_yaml_rows(name: str, text: str) -> list[Row | Problem]:
    """Any YAML layout: compose the node tree so each row keeps its line number."""
    try:
        root = yaml.compose(text, Loader=_YamlLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        return [Problem(name, line, f"YAML syntax error: {getattr(exc, 'problem', exc)}")]
    if root is None:
        return []
    items = None
    if isinstance(root, yaml.MappingNode):
        for key_node, value_node in root.value:
            if key_node.value == "bindings":
                items = value_node
        if items is None:
            return [Problem(name, root.start_mark.line + 1, "no 'bindings' list")]
    else:
        items = root
    if isinstance(items, yaml.ScalarNode) and items.value in _NULLS:
        return []
    if not isinstance(items, yaml.SequenceNode):
        return [Problem(name, items.start_mark.line + 1, "'bindings' is not a list")]
    constructor = yaml.constructor.SafeConstructor()
    out: list[Row | Problem] = []
    for node in items.value:
        line = node.start_mark.line + 1
        try:
            value = constructor.construct_document(node)
        except yaml.YAMLError as exc:
            out.append(Problem(name, line, f"bad YAML value: {exc}"))
            continue
        if isinstance(value, dict):
            out.append(Row(line, {str(k): v for k, v in value.items()}))
        else:
            out.append(Problem(name, line, "not a mapping of binding fields"))
    return out


def read_csv_rows(path: Path) -> Iterator[Row | Problem]:
    """CSV rows `type,x,a,b,ttl` (header optional; `;` accepted as the delimiter)."""
    with path.open(encoding="utf-8", newline="") as handle:
        first = handle.readline()
        delimiter = ";" if first.count(";") > first.count(",") else ","
        handle.seek(0)
        reader = csv.reader(handle, delimiter=delimiter)
        header: tuple[str, ...] = FIELDS
        for record in reader:
            line = reader.line_num
            if not record or (len(record) == 1 and not record[0].strip()):
                continue
            if record[0].lstrip().startswith("#"):
                continue
            cells = [cell.strip() for cell in record]
            if line == 1 and cells[0].lower() in ("type", "kind"):
                header = tuple("type" if c.lower() == "kind" else c.lower() for c in cells)
                continue
            if len(cells) > len(header):
                yield Problem(str(path), line, f"{len(cells)} columns, expected {len(header)}")
                continue
            yield Row(line, dict(zip(header, cells, strict=False)))


def row_to_binding(row: Row, now: float) -> Binding:
    """Validate a raw row; InvalidBinding names the field that is wrong."""
    fields = row.fields
    if isinstance(fields, tuple):  # already shaped by the canonical line regex
        kind, x, a, b, bare_b, ttl = fields
        return make_binding(kind, x, a, b or bare_b, ttl, now)  # type: ignore[arg-type]
    if not fields.keys() <= _FIELD_SET:
        if "kind" in fields and "type" not in fields:
            fields = {("type" if k == "kind" else k): v for k, v in fields.items()}
        unknown = sorted(k for k in fields if k not in _FIELD_SET)
        if unknown:
            raise InvalidBinding(f"unknown field {unknown[0]!r}")
    kind = fields.get("type")
    x = fields.get("x")
    a = fields.get("a")
    ttl = fields.get("ttl")
    for key, value in (("type", kind), ("x", x), ("a", a), ("ttl", ttl)):
        if value is None or value == "":
            raise InvalidBinding(f"missing field {key!r}")
    b = fields.get("b")
    if b is not None:
        b = str(b)
        if b in _NULLS:
            b = None
    optional = {k: v for k, v in fields.items() if k in OPTIONAL_FIELDS
                and v is not None and not (isinstance(v, str) and v in _NULLS)}
    return make_binding(str(kind), str(x), str(a), b, ttl, now,  # type: ignore[arg-type]
                        **optional)


def read_bindings(path: Path | str, now: float) -> Iterator[tuple[int, Binding] | Problem]:
    """Validated bindings with their line numbers; invalid rows come out as Problems."""
    name = str(path)
    for item in read_rows(path):
        if isinstance(item, Problem):
            yield item
            continue
        try:
            yield item.line, row_to_binding(item, now)
        except InvalidBinding as exc:
            yield Problem(name, item.line, str(exc))
