"""ARCHITECTURE.md against the code: every module and symbol it names exists; the house rules it states hold."""

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "ARCHITECTURE.md").read_text()


def _module(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def test_every_named_module_imports():
    paths = sorted(set(re.findall(r"`(pqflex/[\w/]+\.py)`", PAGE)))
    assert len(paths) >= 20
    for path in paths:
        assert (ROOT / path).exists(), path
        importlib.import_module(_module(path))


def test_every_named_symbol_exists():
    """``file.py:Symbol`` names, and the classes and functions the decode-step picture calls."""
    pairs = re.findall(r"`(\w+)\.py:(\w+)`", PAGE)
    pairs += [("layer", "PQLayer.step"), ("layer", "PQCacheState.forward"), ("index", "PQIndex.append"),
              ("index", "PQIndex.plan"), ("index", "Selection"), ("index", "decode_token_list"),
              ("kvstore", "ResidentKV.attend"), ("kvstore", "OffloadedKV.attend"), ("ops.backends", "FusedAttention"),
              ("ops.backends", "GatherAttention"), ("ops.backends", "FlexAttention"),
              ("ops.backends", "attention_backend"), ("integrations.attention", "pqcache_attention_forward"),
              ("ops.portable", "compute_ip_table"), ("kvstore", "device_view")]
    modules = {"caches": "integrations.caches"}
    for file, symbol in pairs:
        obj = importlib.import_module(f"pqflex.{modules.get(file, file)}")
        for part in symbol.split("."):
            obj = getattr(obj, part)


def _sources(*folders: str):
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, ast.parse(path.read_text())


@pytest.mark.parametrize("folder", ["tests", "benchmarks", "evals"])
def test_no_private_pqflex_name_is_imported_from_outside(folder):
    bad = []
    for path, tree in _sources(folder):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pqflex"):
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Import):
                bad += [f"{path.name}: {a.name}" for a in node.names
                        if a.name.startswith("pqflex") and any(p.startswith("_") for p in a.name.split("."))]
    assert not bad, bad


def test_the_library_never_swaps_a_class_and_the_step_has_no_native_one_pass():
    for path, tree in _sources("pqflex"):
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                assert not any(isinstance(t, ast.Attribute) and t.attr == "__class__" for t in targets), path
    assert "decode_step" not in (ROOT / "pqflex/ops/native.py").read_text()


def test_production_code_never_imports_the_test_oracle():
    for path, tree in _sources("pqflex"):
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("tests") for n in names), path
