"""Admin functions and their argparse wiring, on the memory store."""

import argparse
import json
from pathlib import Path

import pytest

from proxy.bindings import admin
from proxy.bindings.memory import MemoryStore
from proxy.bindings.model import AXB, AXN, BindingConflict, InvalidBinding, Outcome
from proxy.cli import make_parser

X = "700100000000001"
X2 = "700100000000002"
A, B, C = "13800000001", "13900000001", "13700000001"


async def test_bind_get_list_unbind() -> None:
    store = MemoryStore()
    binding = await admin.bind_axb(store, "+86" + X, "+8613800000001", B, 60)
    assert (binding.kind, binding.x, binding.a, binding.b) == (AXB, X, A, B)
    axn = await admin.bind_axn(store, X2, C, None, 60)
    assert axn.kind == AXN and axn.b is None
    assert await admin.get(store, X) == [binding]
    assert len(await admin.list_bindings(store)) == 2
    with pytest.raises(BindingConflict):
        await admin.bind_axb(store, X, B, C, 60)
    with pytest.raises(InvalidBinding):
        await admin.bind_axb(store, X, "abc", C, 60)
    assert await admin.unbind(store, X, A) is True
    assert (await store.resolve(X, B)).outcome is Outcome.NO_BINDING


async def test_import_reports_bad_rows_and_binds_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "bindings.csv"
    path.write_text(
        "type,x,a,b,ttl\n"
        f"axb,{X},{A},{B},60\n"
        f"axb,{X},{B},{C},60\n"  # B already bound on X
        f"axb,{X},{A},{B},120\n"  # renewal: fine
        f"axb,{X2},12,{B},60\n"  # bad number
        f"axn,{X2},{C},,60\n"
    )
    store = MemoryStore()
    bound, problems = await admin.import_file(store, path, batch_size=2)
    assert bound == 3
    assert [p.line for p in problems] == [3, 5]
    assert (await store.resolve(X, C)).outcome is Outcome.NOT_PARTY  # row 3 left nothing
    assert (await store.resolve(X2, A)).callee == C


def parse(*argv: str) -> argparse.Namespace:
    """Parse with the real top-level CLI (the interface testers script against)."""
    args = make_parser().parse_args([*argv, "--config", "unused.yaml"])
    args.command = args.bindings_command
    return args


async def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = MemoryStore()
    command = parse("bind", "axb", "--x", X, "--a", A, "--b", B, "--ttl", "60")
    assert await admin.run_command(store, command) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["type"] == "axb" and printed["b"] == B and 58 <= printed["ttl"] <= 60
    command = parse("bind", "axn", "--x", X2, "--a", C, "--ttl", "60")
    assert await admin.run_command(store, command) == 0
    capsys.readouterr()
    assert await admin.run_command(store, parse("bindings", "list", "--prefix", "7001")) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert await admin.run_command(store, parse("bindings", "get", "--x", X)) == 0
    assert json.loads(capsys.readouterr().out)["a"] == A
    assert await admin.run_command(store, parse("unbind", "--x", X, "--number", A)) == 0
    assert await admin.run_command(store, parse("unbind", "--x", X, "--number", A)) == 1
    capsys.readouterr()
    path = tmp_path / "b.yaml"
    path.write_text(f'bindings:\n  - {{type: axb, x: "{X}", a: "{A}", ttl: 5}}\n')
    assert await admin.run_command(store, parse("bindings", "import", str(path))) == 2
    out = capsys.readouterr().out
    assert f"{path}:2:" in out and json.loads(out.splitlines()[-1])["skipped"] == 1
