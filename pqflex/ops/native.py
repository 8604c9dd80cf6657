"""Native CPU kernels of the decode step and of k-means: ``cpu_kernels.c`` compiled on first use, called through
ctypes.

On the CPU a decode step through the plain-torch reference is a chain of small tensor ops (ADC scores of every
head, a softmax, a sort-free top-k, a gather, attention), and their per-op overhead makes it slower than dense
attention at the contexts a CPU runs. The C kernels do each op in one pass (fp32 only). They are built with the
system C compiler (``$CC``, with any flags in it, else ``cc``/``gcc``/``clang``) into ``$PQFLEX_CACHE_DIR`` (default
``~/.cache/pqflex``), once per source version and compiler command, and loaded with ctypes: no torch headers, about a
second to build. A cached file that does not load or lacks the kernels is rebuilt once.

Where no compiler is found or the build fails, :func:`library` returns None, one warning says why, and the ops
run the reference. ``PQFLEX_NATIVE=0`` turns the kernels off. The kernels are checked against the reference in
``tests/test_native.py`` (k-means: ``tests/test_kernels.py``). The k-means step is the CPU kernel of
``torch.ops.pqflex.kmeans``, which trains the codebooks on the CPU beside a GPU prefill (``kmeans_device="cpu"``).
"""

from __future__ import annotations

import _ctypes
import concurrent.futures
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from pqflex.ops import reference
from pqflex.storage import cache_dir

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99", "-fvisibility=hidden")
_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


def _compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` split like a shell word list (``CC="gcc -O2"`` keeps its flags), else the
    first of ``cc``, ``gcc`` and ``clang`` on the PATH."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    found = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    return None if found is None else [found]


def _build(compiler: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, then rename: safe when concurrent
        out = Path(tmp) / target.name
        cmd = [*compiler, *FLAGS, str(SOURCE), "-o", str(out), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {result.stderr.strip()[-500:]}")
        os.replace(out, target)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.pq_select_f32.restype = ctypes.c_int
    lib.pq_select_f32.argtypes = [_ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr] + [_i64] * 7 + [_f32, _ptr]
    lib.sparse_attention_f32.restype = ctypes.c_int
    lib.sparse_attention_f32.argtypes = ([_ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr,
                                          _ptr] + [_i64] * 5 + [_f32, _ptr])
    lib.decode_step_f32.restype = ctypes.c_int
    lib.decode_step_f32.argtypes = ([_ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _ptr,
                                     _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr] + [_i64] * 8
                                    + [_f32, _ptr, _i64, _i64, _ptr])
    lib.pq_encode_f32.restype = ctypes.c_int
    lib.pq_encode_f32.argtypes = [_ptr, _i64, _i64, _ptr] + [_i64] * 5 + [_ptr]
    lib.kmeans_step_f32.restype = ctypes.c_int
    lib.kmeans_step_f32.argtypes = [_ptr, _i64, _i64, _ptr, _ptr] + [_i64] * 5 + [_ptr] * 3
    return lib


def _load(target: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(target))
    try:
        return _declare(lib)
    except AttributeError:  # loaded without the kernels: unload it, or a rebuild at this path would get it back
        if hasattr(_ctypes, "dlclose"):
            _ctypes.dlclose(lib._handle)
        raise


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, built first if needed; None (after one warning) where they cannot be had."""
    if os.environ.get("PQFLEX_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn("pqflex: no C compiler found (set CC); CPU decode runs the slower plain-torch reference",
                      RuntimeWarning, stacklevel=2)
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((*compiler, *FLAGS)).encode()).hexdigest()[:16]
    suffix = ".dll" if sys.platform == "win32" else ".so"
    target = cache_dir() / f"cpu_kernels-{platform.machine()}-{digest}{suffix}"
    try:
        built = not target.exists()
        if built:
            _build(compiler, target)
        try:
            return _load(target)
        except (OSError, AttributeError):  # a damaged cached file (unloadable, or without the kernels): once more
            if built:
                raise
            _build(compiler, target)
            return _load(target)
    except (OSError, RuntimeError, AttributeError) as err:
        warnings.warn(f"pqflex: the native CPU kernels are unavailable ({err}); CPU decode runs the slower "
                      "plain-torch reference", RuntimeWarning, stacklevel=2)
        return None


def _p(t: torch.Tensor) -> int:
    return t.data_ptr()


def _rowwise(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is contiguous, else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels serve these tensors: CPU, fp32 where floating, and the library loaded."""
    return (all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors)
            and library() is not None)


def pq_select(ip_table: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, topk: torch.Tensor,
              k_max: int, scale: float) -> torch.Tensor:
    """:func:`pqflex.ops.reference.pq_select` in one pass (fp32 ``ip_table``; checked by the caller)."""
    B, Hkv, G, M, ksub = ip_table.shape
    if ksub < 256 and codes.numel() and int(codes.max()) >= ksub:  # the C reads the table unchecked
        raise IndexError(f"pq_select: a code is {int(codes.max())}, out of range for ksub={ksub}")
    table = ip_table.contiguous()
    codes = _rowwise(codes)
    lo, hi, topk = (t.to(torch.int64).contiguous() for t in (lo, hi, topk))
    out = torch.empty(B, Hkv, k_max, dtype=torch.int32)
    rc = library().pq_select_f32(_p(table), _p(codes), *codes.stride()[:3], _p(lo), _p(hi), _p(topk), B, Hkv, G, M,
                                 ksub, codes.shape[2], k_max, scale, _p(out))
    if rc != 0:
        raise MemoryError(f"pq_select: out of memory for {codes.shape[2]} tokens")
    return out


def sparse_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor,
                            valid: torch.Tensor | None, scale: float) -> torch.Tensor:
    """:func:`pqflex.ops.reference.sparse_decode_attention` by index, no gathered copy (fp32; checked by the
    caller)."""
    B, H, _, D = query.shape
    _, Hkv, T = idx.shape
    query, key, value = _rowwise(query), _rowwise(key), _rowwise(value)
    idx = idx.to(torch.int64).contiguous()
    if int(idx.min()) < 0 or int(idx.max()) >= key.shape[2]:  # the C reads rows unchecked; the reference raises
        raise IndexError(f"sparse_decode_attention: idx holds positions outside [0, {key.shape[2]})")
    valid = None if valid is None else valid.contiguous()  # bool: one byte per slot
    out = torch.empty(B, H, 1, D, dtype=torch.float32)
    rc = library().sparse_attention_f32(_p(query), query.stride(0), query.stride(1), _p(key), *key.stride()[:3],
                                        _p(value), *value.stride()[:3], _p(idx),
                                        None if valid is None else _p(valid), B, Hkv, H // Hkv, T, D, scale, _p(out))
    if rc != 0:
        raise MemoryError(f"sparse_decode_attention: out of memory for {T} tokens")
    return out


def decode_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, centroids: torch.Tensor,
                codes: torch.Tensor, start: torch.Tensor, sink: torch.Tensor, recent: torch.Tensor, topk: torch.Tensor,
                n: int, k_max: int, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decode step of :class:`pqflex.PQIndex` (token selection, PQ scores) in one pass, fp32.

    The same math as ``PQIndex.step`` through the ops: the table of ``q . centroids``, :func:`pq_select` over
    ``[start + sink, n - recent)``, attention over sink + selected + recent; and the code of the newest key (row
    ``n - 1``, never a candidate) as ``pq_encode`` gives it. ``query [B, H, 1, D]``, ``key``/``value [B, Hkv,
    C >= n, D]``, ``centroids [B, Hkv, M, ksub, dsub]``, ``codes [B, Hkv, >= n - 1, M]``, ``start``/``sink``/
    ``recent``/``topk`` ``[B]``.

    Returns:
        attention ``[B, H, 1, D]`` fp32 and the newest key's codes ``[B, Hkv, 1, M]`` uint8 (None if that key holds
        a non-finite value: the reference's arithmetic decides its code).
    """
    B, H, _, D = query.shape
    Hkv, M, ksub, dsub = centroids.shape[1:]
    if not 1 <= n <= key.shape[2] or codes.shape[2] < n - 1:  # the C reads rows [0, n) unchecked
        raise ValueError(f"decode_step: n={n} out of range for {key.shape[2]} cached rows and {codes.shape[2]} codes")
    query, key, value, codes = _rowwise(query), _rowwise(key), _rowwise(value), _rowwise(codes)
    centroids = centroids.contiguous()
    start, sink, recent, topk = (t.to(torch.int64).contiguous() for t in (start, sink, recent, topk))
    out = torch.empty(B, H, 1, D, dtype=torch.float32)
    new = torch.empty(B, Hkv, 1, M, dtype=torch.uint8)
    rc = library().decode_step_f32(_p(query), query.stride(0), query.stride(1), _p(key), *key.stride()[:3],
                                   _p(value), *value.stride()[:3], _p(centroids), _p(codes), *codes.stride()[:3],
                                   _p(start), _p(sink), _p(recent), _p(topk), B, Hkv, H // Hkv, M, ksub, dsub, n,
                                   k_max, scale, _p(new), new.stride(0), new.stride(1), _p(out))
    if rc < 0:
        raise MemoryError(f"decode_step: out of memory for {n} tokens")
    return out, None if rc else new


def pq_encode(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor | None:
    """:func:`pqflex.ops.reference.pq_encode` of fp32 ``x`` (distances as ``sum (x - c)^2``); None if ``x`` holds
    a non-finite value (whose codes the reference's arithmetic decides)."""
    L, N, _ = x.shape
    M, ksub, dsub = centroids.shape[1:]
    x, centroids = _rowwise(x), centroids.contiguous()
    out = torch.empty(L, N, M, dtype=torch.uint8)
    bad = library().pq_encode_f32(_p(x), x.stride(0), x.stride(1), _p(centroids), L, N, M, ksub, dsub, _p(out))
    return None if bad else out


def kmeans(x: torch.Tensor, mask: torch.Tensor | None, ksub: int, niter: int, seed: int = 0, tol: float = 0.0,
           threads: int = 1) -> torch.Tensor:
    """:func:`pqflex.ops.reference.kmeans` with the Lloyd assignment in C, the ``L`` problems split over ``threads``
    threads (the C call releases the GIL). Each problem is summed by one thread in point order, so the result does
    not depend on ``threads``; it equals the reference up to float rounding of the distances (a near-tie can go to
    the other centroid)."""
    L, N, dsub = x.shape
    w = reference.kmeans_weights(x, mask).contiguous()
    xf = torch.where(w[..., None] > 0, x.float(), 0.0).contiguous()
    lib = library()
    parts = max(1, min(L, threads))
    bounds = [(L * i // parts, L * (i + 1) // parts) for i in range(parts)]

    def step(centroids: torch.Tensor):
        c = centroids.contiguous()
        sums, counts, dist = torch.empty(L, ksub, dsub), torch.empty(L, ksub), torch.empty(L, N)

        def run(part: tuple[int, int]) -> int:
            return lib.kmeans_step_f32(_p(xf), xf.stride(0), xf.stride(1), _p(w), _p(c), *part, N, ksub, dsub,
                                       _p(sums), _p(counts), _p(dist))

        if any(pool.map(run, bounds) if pool is not None else map(run, bounds)):
            raise MemoryError(f"kmeans: out of memory for {ksub} centroids of {dsub} dims")
        return sums, counts, dist

    pool = concurrent.futures.ThreadPoolExecutor(parts, thread_name_prefix="pqflex-lloyd") if parts > 1 else None
    try:
        return reference.lloyd(xf, w, ksub, niter, seed, tol, step)
    finally:
        if pool is not None:
            pool.shutdown()
