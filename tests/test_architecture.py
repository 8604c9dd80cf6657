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
              ("index", "PQIndex.plan"), ("index", "Selection"), ("index", "Selection.token_list"),
              ("ops.portable", "decode_token_list"), ("kvstore", "ResidentKV.attend"), ("kvstore", "OffloadedKV.attend"), ("ops.backends", "FusedAttention"),
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


@pytest.mark.parametrize("cache_kind", ["static", "growing", "adopted"])
def test_one_decode_step_passes_through_four_files(cache_kind):
    """From the attention function to the kernels (``pqflex/ops/``), a decode step runs code of at most four files of
    the package: integrations/attention.py, layer.py, index.py, kvstore.py (eager on the CPU, traced)."""
    import sys

    import torch
    from transformers import DynamicCache

    import pqflex
    from tests.test_transformers import CACHE_KW, SPARSE, make, prompt

    model = make("llama")
    pqflex.configure(model, SPARSE)
    cache = {"static": lambda: pqflex.PQStaticCache(model, 400), "growing": lambda: pqflex.PQCache(model),
             "adopted": lambda: DynamicCache(config=model.config)}[cache_kind]()
    with torch.no_grad():
        out = model(prompt(300), **{CACHE_KW: cache}, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        model(token, **{CACHE_KW: cache}, use_cache=True)  # the first step of a growing cache builds the index
        seen, inside = set(), []

        def profile(frame, event, arg):  # files of the package run inside the attention function
            if frame.f_code.co_name == "pqcache_attention_forward" and event in ("call", "return"):
                inside.append(event == "call") if event == "call" else inside.pop()
            if event == "call" and inside:
                path = Path(frame.f_code.co_filename)
                if "pqflex" in path.parts and "ops" not in path.parts:
                    seen.add(path.relative_to(ROOT).as_posix())

        sys.setprofile(profile)
        try:
            model(token, **{CACHE_KW: cache}, use_cache=True)
        finally:
            sys.setprofile(None)
    assert seen == {"pqflex/integrations/attention.py", "pqflex/layer.py", "pqflex/index.py", "pqflex/kvstore.py"}, \
        sorted(seen)
