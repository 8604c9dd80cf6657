"""The native CPU kernels (pqflex/ops/cpu_kernels.c through ctypes) against the plain-torch reference."""

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from pqflex import PQConfig
from pqflex.index import PQIndex
from pqflex.layer import PQLayer
from pqflex.ops import native, portable
from tests.helpers import clustered_keys, decode
from tests.test_pq_select import agg_scores, check, check_op, make_inputs, make_op_inputs
from tests.test_sparse_attention import make_inputs as attention_inputs

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler: the reference serves the CPU")


def test_the_library_builds_where_a_compiler_exists():
    """CI has a C compiler: `pip install -e .` (make setup) must have built the kernels, not silently left them out."""
    if shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"):
        assert native.library() is not None


@pytest.fixture
def library_at(monkeypatch):
    """Point the loader at another library file (no process-wide state left behind)."""
    def point(path):
        monkeypatch.setattr(native.native_build, "LIBRARY", path)
        native.library.cache_clear()
    yield point
    native.library.cache_clear()


def _one_warning(match):
    with pytest.warns(RuntimeWarning, match=match) as caught:
        assert native.library() is None
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None  # cached: no second warning


def test_switch_and_a_missing_library_fall_back_with_one_warning(monkeypatch, library_at, tmp_path):
    library_at(native.native_build.LIBRARY)
    monkeypatch.setenv("PQFLEX_NATIVE", "0")
    assert native.library() is None and not native.usable(torch.zeros(1))
    monkeypatch.delenv("PQFLEX_NATIVE")
    library_at(tmp_path / "_cpu_kernels.so")
    _one_warning("was not built when pqflex was installed, for want of a C compiler")


needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


@needs_gcc
def test_cc_with_flags_is_honoured_at_build_time(monkeypatch, tmp_path, library_at):
    """``CC="gcc -O2"`` is a command with flags (it used to be looked up as one program name and fail)."""
    log = tmp_path / "args"
    wrapper = tmp_path / "cc.sh"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec gcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", f"{wrapper} -O2 -DPQFLEX_FLAG_SEEN")
    built = native.native_build.build(tmp_path / "lib" / "_cpu_kernels.so")
    assert "-O2 -DPQFLEX_FLAG_SEEN" in log.read_text()
    library_at(built)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is not None


@needs_gcc
@pytest.mark.parametrize("damage", ["garbage", "other symbols", "stale"])
def test_a_damaged_or_stale_library_falls_back_with_one_warning_saying_what_to_do(damage, tmp_path, library_at,
                                                                                   monkeypatch):
    """No compiler runs at run time: a library that does not load, lacks the kernels or was built from another
    ``cpu_kernels.c`` is reported once (with the command that rebuilds it) and the plain-torch code runs."""
    import subprocess

    path = tmp_path / "_cpu_kernels.so"
    if damage == "garbage":
        path.write_bytes(b"not a shared object")
        match = "does not load"
    elif damage == "other symbols":
        other = tmp_path / "other.c"
        other.write_text("int something_else(void) { return 1; }\n")
        subprocess.run(["gcc", "-shared", "-fPIC", str(other), "-o", str(path)], check=True)
        match = "lacks the kernels"
    else:
        native.native_build.build(path)
        edited = tmp_path / "cpu_kernels.c"
        edited.write_text(native.native_build.SOURCE.read_text() + "\n/* edited */\n")
        monkeypatch.setattr(native.native_build, "SOURCE", edited)
        match = "built from another cpu_kernels.c; rebuild it"
    library_at(path)
    _one_warning(match)


@pytest.mark.slow
@needs_gcc
def test_the_wheel_ships_the_kernels_and_nothing_compiles_or_writes_at_run_time(tmp_path):
    """`pip wheel .` builds a platform wheel holding the library; installed (without a compiler on the PATH and
    with an empty HOME) its kernels load, and nothing is written to the home directory."""
    import os
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                           str(root)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("pqflex-*.whl")
    assert not wheel.name.endswith("-none-any.whl"), wheel.name  # platform-tagged: it holds a binary
    assert "pqflex/ops/_cpu_kernels.so" in zipfile.ZipFile(wheel).namelist()
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": "/nonexistent", "HOME": str(home), "PYTHONPATH": str(tmp_path / "site")}
    code = ("import warnings; warnings.simplefilter('error'); from pqflex.ops import native; "
            "assert native.library() is not None; print(native.native_build.LIBRARY)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert str(tmp_path / "site") in run.stdout and not any(home.iterdir())


@needs_native
@pytest.mark.parametrize("B,Hkv,G,M,nbits,N,frac", [
    (1, 2, 4, 8, 8, 1000, 0.1),
    (3, 1, 1, 1, 8, 777, 0.05),
    (2, 3, 3, 4, 4, 333, 1.0),
    (1, 2, 8, 16, 6, 2049, 0.2),
    (2, 1, 3, 6, 8, 300, 0.3),
    (1, 1, 4, 2, 6, 5, 0.5),  # fewer tokens than a tile
])
def test_pq_select_matches_reference(B, Hkv, G, M, nbits, N, frac):
    check(native.pq_select, make_inputs(B, Hkv, G, M, nbits, N, frac, device="cpu"))
    op, ref = make_op_inputs(B, Hkv, G, M, nbits, N, frac, device="cpu")
    out = check_op(op, ref, native.pq_select_query)  # the table computed in C
    assert torch.equal(torch.ops.pqflex.pq_select(*op), out)  # the op's CPU kernel


@needs_native
@pytest.mark.parametrize("distinct", [1, 3])
def test_pq_select_exact_ties_go_to_the_later_token(distinct):
    """Few distinct codes: exact ties everywhere, broken like the reference (later token first)."""
    args = make_inputs(3, 2, 4, 4, 6, 700, 0.3, distinct=distinct, device="cpu")
    assert torch.equal(native.pq_select(*args), portable.pq_select(*args))


@needs_native
def test_pq_select_edge_rows_and_integer_scores_equal_the_reference_exactly():
    """topk 0, topk above the candidates, no candidates; integer tables: no near-ties, so equal to the slot."""
    args = make_inputs(3, 2, 4, 2, 6, 400, 0.2, edge_rows=True, device="cpu")
    args[0] = args[0].mul(4).round()
    assert torch.equal(native.pq_select(*args), portable.pq_select(*args))


@needs_native
@pytest.mark.parametrize("G,T,masked", [(1, 1, True), (4, 57, True), (2, 200, False), (16, 90, True)])
def test_sparse_attention_matches_reference(G, T, masked):
    q, k, v, idx, valid = attention_inputs(3, 2, G, 64, 250, T, device="cpu")
    valid = valid if masked else None
    out = native.sparse_decode_attention(q, k, v, idx, valid, 0.3)
    torch.testing.assert_close(out, portable.sparse_decode_attention(q, k, v, idx, valid, 0.3), atol=2e-6,
                               rtol=1e-5)
    if masked:
        assert (out[-1, :G] == 0).all()  # a list with no valid token attends nothing
    assert torch.equal(torch.ops.pqflex.sparse_decode_attention(q, k, v, idx.int(), valid, 0.3), out)


@needs_native
def test_out_of_range_indices_raise_instead_of_reading_past_the_buffers():
    q, k, v, idx, valid = attention_inputs(1, 2, 3, 16, 60, 20, device="cpu")
    idx[0, 1, 4] = 60
    with pytest.raises(IndexError, match=r"outside \[0, 60\)"):
        native.sparse_decode_attention(q, k, v, idx, valid, 0.5)
    args = make_inputs(1, 2, 4, 2, 4, 100, 0.1, device="cpu")
    args[1][0, 0, int(args[2][0]), 1] = 16  # a candidate's code (those outside [lo, hi) are never read)
    with pytest.raises(IndexError, match="out of range for ksub=16"):
        native.pq_select(*args)


@needs_native
def test_sparse_attention_nan_key_matches_reference():
    q, k, v, idx, valid = attention_inputs(2, 2, 3, 16, 60, 20, device="cpu")
    k[0, 1, idx[0, 1, 0]] = float("nan")
    out = native.sparse_decode_attention(q, k, v, idx, valid, 0.5)
    torch.testing.assert_close(out, portable.sparse_decode_attention(q, k, v, idx, valid, 0.5), equal_nan=True)


@needs_native
def test_pq_encode_matches_reference_and_leaves_non_finite_keys_to_it():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(4, 7, 64, generator=g), torch.randn(4, 8, 256, 8, generator=g)
    assert torch.equal(native.pq_encode(x, c), portable.pq_encode(x, c))
    x[1, 3, 5] = float("inf")
    assert native.pq_encode(x, c) is None
    assert torch.equal(torch.ops.pqflex.pq_encode(x, c), portable.pq_encode(x, c))


@needs_native
@pytest.mark.parametrize("dsub,ksub", [(1, 2), (3, 4), (4, 16), (5, 64), (8, 256), (10, 8)])
def test_pq_encode_of_every_subspace_width_matches_reference(dsub, ksub):
    """Four centroids at a time in SSE lanes, the rest of the centroids and sub-vector in plain C: the codes of
    the reference (ties to the lowest index; random floats have no near-ties at this size)."""
    g = torch.Generator().manual_seed(dsub * 1000 + ksub)
    x, c = torch.randn(3, 5, 4 * dsub, generator=g), torch.randn(3, 4, ksub, dsub, generator=g)
    c[0, 0, ksub // 2] = c[0, 0, 0]  # an exact tie: the lower index wins
    x[0, 0, :dsub] = c[0, 0, 0]
    codes = native.pq_encode(x, c)
    assert codes[0, 0, 0] == 0
    assert torch.equal(codes, portable.pq_encode(x, c))


def _index_pair(B, N, budget, capacity=None, start=None):
    """Two identical indexes of clustered keys (one for each path), their K/V and a query."""
    g = torch.Generator().manual_seed(N)
    Hkv, G, D = 2, 3, 32
    k = clustered_keys(B, Hkv, N + 1, D, generator=g)
    v = torch.randn(B, Hkv, N + 1, D, generator=g)
    q = torch.randn(B, 1, Hkv * G, D, generator=g).transpose(1, 2)
    mask = None
    if start is not None:
        mask = torch.arange(N)[None, :] >= torch.tensor(start)[:, None]
    cfg = PQConfig(M=4, nbits=6, niter=3, budget=budget, sink_size=4, min_context=64)
    idx = [PQIndex.build(k[:, :, :N], cfg, mask, capacity) for _ in range(2)]
    if capacity is not None:
        k, v = (torch.cat([t, t.new_zeros(B, Hkv, capacity - N - 1, D)], dim=2) for t in (k, v))
    return idx, q, k, v, D ** -0.5


def _step(index, q, k, v, n, scale):
    """A decode step as PQLayer.step runs it: append the newest key (row n - 1), plan, attend."""
    growing = index.num_tokens < k.shape[2]
    index.append(k[:, :, n - 1:n], None if growing else torch.tensor(n - 1))
    return decode(index, q, k, v, n if growing else torch.tensor(n), scale)


@needs_native
@pytest.mark.parametrize("capacity", [None, 700])
@pytest.mark.parametrize("start", [None, [0, 37]])
def test_decode_step_through_the_native_ops_equals_the_plain_torch_path(monkeypatch, capacity, start):
    """append + plan + attend with the ops' C kernels (encode, select, attend) == the same with plain torch."""
    (fast, slow), q, k, v, scale = _index_pair(2, 600, 0.1, capacity, start)
    out = _step(fast, q, k, v, 601, scale)
    monkeypatch.setattr(native, "usable", lambda *t: False)
    want = _step(slow, q, k, v, 601, scale)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
    assert torch.equal(fast.codes, slow.codes)
    assert fast.codes.shape[2] == (capacity or 601)


@needs_native
def test_decode_step_of_a_non_finite_key_encodes_it_like_the_plain_torch_path(monkeypatch):
    (fast, slow), q, k, v, scale = _index_pair(1, 300, 0.2)
    k[0, 1, 300, 3] = float("inf")
    _step(fast, q, k, v, 301, scale)
    monkeypatch.setattr(native, "usable", lambda *t: False)
    _step(slow, q, k, v, 301, scale)
    assert torch.equal(fast.codes, slow.codes)


@needs_native
def test_a_long_cpu_generation_equals_the_reference_path(monkeypatch):
    """Thirty steps of a layer runtime: the native path keeps selecting and attending what the ops do."""
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, D, N = 1, 2, 2, 32, 500
    k, v = clustered_keys(B, Hkv, N + 30, D, generator=g), torch.randn(B, Hkv, N + 30, D, generator=g)
    qs = torch.randn(30, B, Hkv * G, 1, D, generator=g)
    cfg = PQConfig(M=4, nbits=5, niter=3, budget=0.15, sink_size=4, min_context=64)
    outs = []
    for use in (True, False):
        if not use:
            monkeypatch.setattr(native, "usable", lambda *t: False)
        layer = PQLayer(cfg)
        layer.prefill(k[:, :, :N], v[:, :, :N])  # the prompt, indexed now
        outs.append(torch.stack([layer.forward(qs[i], k[:, :, :N + i + 1], v[:, :, :N + i + 1])
                                 for i in range(30)]))
    torch.testing.assert_close(outs[0], outs[1], atol=2e-6, rtol=1e-5)


@needs_native
def test_pq_select_ranks_subnormal_probabilities_like_the_reference():
    """Scores far apart: most probabilities are subnormal (exp below -87), still ranked, not flushed to ties."""
    args = make_inputs(2, 2, 3, 4, 6, 600, 0.9, device="cpu")  # deep into the tail
    args[0] = args[0] * 150.0
    out, ref = native.pq_select(*args), portable.pq_select(*args)
    agg = agg_scores(*args[:4], args[6])
    tiny = (agg > 0) & (agg < 1.1754944e-38)
    assert tiny.sum() > 100  # the case is exercised
    for row_out, row_ref, row_s in zip(out.flatten(0, 1), ref.flatten(0, 1), agg.flatten(0, 1)):
        got, want = row_s[row_out[row_out >= 0].long()], row_s[row_ref[row_ref >= 0].long()]
        torch.testing.assert_close(got.sort().values, want.sort().values, rtol=1e-3, atol=0)
