"""Native CPU kernels of the decode step and of k-means: ``cpu_kernels.c``, built when pqflex is installed, called
through ctypes.

On the CPU a decode step through the plain-torch code is a chain of small tensor ops (ADC scores of every head, a
softmax, a sort-free top-k, a gather, attention), and their per-op overhead makes it slower than dense attention at
the contexts a CPU runs. The C kernels do each op in one pass (fp32 only). The wheel's build hook compiles them
(:mod:`pqflex.ops.native_build`: plain C, no torch headers, one binary for every torch) into the package; nothing is
compiled or written at run time.

Where the library is missing (no compiler at install time), damaged, or built from another ``cpu_kernels.c``,
:func:`library` returns None, one warning says why and what to do, and the ops run the plain-torch code.
``PQFLEX_NATIVE=0`` turns the kernels off. The kernels are checked against the reference in
``tests/test_native.py`` (k-means: ``tests/test_kernels.py``). The k-means step is the CPU kernel of
``torch.ops.pqflex.kmeans``, which trains the codebooks on the CPU beside a GPU prefill (``kmeans_device="cpu"``).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import os
import warnings

import torch

from pqflex.ops import native_build, portable

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.pq_select_f32.restype = ctypes.c_int
    lib.pq_select_f32.argtypes = [_ptr, _ptr] + [_i64] * 3 + [_ptr, _i64, _ptr] + [_i64] * 3 + [_ptr, _i64, _ptr] + \
        [_i64] * 7 + [_f32, _ptr]
    lib.sparse_attention_f32.restype = ctypes.c_int
    lib.sparse_attention_f32.argtypes = ([_ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _i64, _i64, _ptr,
                                          ctypes.c_int, _ptr, _ptr] + [_i64] * 8 + [_f32, _ptr])
    lib.pq_encode_f32.restype = ctypes.c_int
    lib.pq_encode_f32.argtypes = [_ptr, _i64, _i64, _ptr] + [_i64] * 5 + [_ptr]
    lib.kmeans_step_f32.restype = ctypes.c_int
    lib.kmeans_step_f32.argtypes = [_ptr, _i64, _i64, _ptr, _ptr] + [_i64] * 5 + [_ptr] * 3
    return lib


def _unavailable(why: str) -> None:
    warnings.warn(f"pqflex: the native CPU kernels are unavailable ({why}); CPU decode runs the slower plain-torch "
                  "code", RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The kernels built when pqflex was installed (``native_build.LIBRARY``), loaded once; None, after one warning,
    where they are missing, damaged or built from another ``cpu_kernels.c``. Nothing is compiled here."""
    if os.environ.get("PQFLEX_NATIVE", "1") == "0":
        return None
    path = native_build.LIBRARY
    if not path.exists():
        _unavailable(f"{path.name} was not built when pqflex was installed, for want of a C compiler: reinstall "
                     "pqflex where one is (pip install -e . in a checkout, or python -m pqflex.ops.native_build)")
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        _unavailable(f"{path} does not load: {err}; reinstall pqflex")
        return None
    try:
        lib.pqflex_source_digest.restype = ctypes.c_char_p
        built = lib.pqflex_source_digest().decode()
        _declare(lib)
    except AttributeError as err:
        _unavailable(f"{path} lacks the kernels ({err}); reinstall pqflex")
        return None
    if native_build.SOURCE.exists() and built != native_build.source_digest():
        _unavailable(f"{path.name} was built from another cpu_kernels.c; rebuild it: pip install -e . (or make "
                     "setup, or python -m pqflex.ops.native_build)")
        return None
    return lib


_LIB = torch.library.Library("pqflex", "FRAGMENT")  # noqa: TOR901  (CPU kernels of the ops defined in their files)


class _NoGradient(torch.autograd.Function):
    """Records a kernel call for autograd with a backward that raises, as a ``custom_op`` without a registered
    gradient does."""

    @staticmethod
    def forward(ctx, op, *args):
        ctx.op = op
        return getattr(torch.ops.pqflex, op)(*args)  # grad mode is off in here: the plain call below

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"torch.ops.pqflex.{ctx.op} has no gradient: pqflex's ops are inference-only")


def register_cpu(op: str, kernel) -> None:
    """Register ``kernel`` as the CPU kernel of ``torch.ops.pqflex.<op>`` (defined by ``torch.library.custom_op``
    or ``triton_op`` in the op's file) straight at the dispatcher's ``CPU`` key, with a thin ``AutogradCPU`` kernel
    that continues below autograd. A CPU call then skips ``custom_op``'s Python layers (autograd wrapper, aliasing
    check, dynamo guard: about 20 µs a call, and a decode step makes three calls a layer). Below autograd the
    dispatch is unchanged, so fake tensors (``torch.compile``) still reach the op's fake implementation; a call
    autograd must record (grad mode on, an input requiring grad) is recorded and its backward raises."""
    overload = getattr(torch.ops.pqflex, op).default

    def autograd_kernel(*args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return _NoGradient.apply(op, *args)
        with torch._C._AutoDispatchBelowAutograd():  # what custom_op's own autograd kernel does, in C++ only
            return overload(*args)

    _LIB.impl(op, kernel, "CPU")
    _LIB.impl(op, autograd_kernel, "AutogradCPU")


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
    """:func:`pqflex.ops.portable.pq_select` in one pass (fp32 ``ip_table``; checked by the caller)."""
    B, Hkv, G, M, ksub = ip_table.shape
    N = codes.shape[2]
    spans = torch.stack([lo.to(torch.int64), torch.zeros_like(lo, dtype=torch.int64), N - hi.to(torch.int64)], -1)
    table = ip_table.contiguous()  # candidates [lo, hi) as spans with sink 0
    return _select(table, None, None, codes, spans, N, topk, (B, Hkv, G, M, ksub, 0), k_max, scale)


def pq_select_query(query: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, spans: torch.Tensor,
                    topk: torch.Tensor, n: torch.Tensor | None, k_max: int, scale: float) -> torch.Tensor:
    """``torch.ops.pqflex.pq_select`` on the CPU: one C call for the table ``q . centroids`` of each KV head, the
    candidate range from ``spans`` and ``n``, and the selection (fp32; checked by the caller)."""
    B, Hkv, G, _ = query.shape
    M, ksub, dsub = centroids.shape[2:]
    return _select(None, _rowwise(query), centroids.contiguous(), codes, spans,
                   codes.shape[2] if n is None else int(n), topk, (B, Hkv, G, M, ksub, dsub), k_max, scale)


def _select(table: torch.Tensor | None, query: torch.Tensor | None, centroids: torch.Tensor | None,
            codes: torch.Tensor, spans: torch.Tensor, n: int, topk: torch.Tensor, dims: tuple, k_max: int,
            scale: float) -> torch.Tensor:
    B, Hkv, G, M, ksub, dsub = dims
    codes = _rowwise(codes)
    spans, topk = spans.to(torch.int64).contiguous(), topk.to(torch.int64).contiguous()
    q_strides = (0, 0, 0) if query is None else query.stride()[:3]
    out = torch.empty(B, Hkv, k_max, dtype=torch.int32)
    rc = library().pq_select_f32(None if table is None else _p(table), None if query is None else _p(query),
                                 *q_strides, None if centroids is None else _p(centroids), dsub, _p(codes),
                                 *codes.stride()[:3], _p(spans), n, _p(topk), B, Hkv, G, M, ksub, codes.shape[2],
                                 k_max, scale, _p(out))
    if rc == 2:
        raise IndexError(f"pq_select: a candidate's code is out of range for ksub={ksub}")
    if rc != 0:
        raise MemoryError(f"pq_select: out of memory for {codes.shape[2]} tokens")
    return out


def sparse_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor,
                            valid: torch.Tensor | None, scale: float, spans: torch.Tensor | None = None,
                            n: torch.Tensor | None = None, sink: int = 0, recent: int = 0) -> torch.Tensor:
    """:func:`pqflex.ops.portable.sparse_decode_attention` by index, no gathered copy and no token list built (fp32;
    checked by the caller)."""
    B, H, _, D = query.shape
    _, Hkv, W = idx.shape
    query, key, value = _rowwise(query), _rowwise(key), _rowwise(value)
    idx = idx.contiguous() if idx.dtype in (torch.int32, torch.int64) else idx.to(torch.int64).contiguous()
    valid = None if valid is None else valid.contiguous()  # bool: one byte per slot
    spans = None if spans is None else spans.to(torch.int64).contiguous()
    filled = key.shape[2] if n is None else int(n)  # a CPU tensor: no device sync
    out = torch.empty(B, H, 1, D, dtype=torch.float32)
    rc = library().sparse_attention_f32(_p(query), query.stride(0), query.stride(1), _p(key), *key.stride()[:3],
                                        _p(value), *value.stride()[:3], key.shape[2], _p(idx),
                                        int(idx.dtype == torch.int32), None if valid is None else _p(valid),
                                        None if spans is None else _p(spans), filled, sink, recent, B, Hkv, H // Hkv,
                                        W, D, scale, _p(out))
    if rc == 2:
        raise IndexError(f"sparse_decode_attention: a row to attend is outside [0, {key.shape[2]}) (a listed "
                         f"position, or a recent one of n={filled})")
    if rc != 0:
        raise MemoryError(f"sparse_decode_attention: out of memory for {sink + W + recent} tokens")
    return out


def pq_encode(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor | None:
    """:func:`pqflex.ops.portable.pq_encode` of fp32 ``x`` (distances as ``sum (x - c)^2``); None if ``x`` holds
    a non-finite value (whose codes the reference's arithmetic decides)."""
    L, N, _ = x.shape
    M, ksub, dsub = centroids.shape[1:]
    x, centroids = _rowwise(x), centroids.contiguous()
    out = torch.empty(L, N, M, dtype=torch.uint8)
    bad = library().pq_encode_f32(_p(x), x.stride(0), x.stride(1), _p(centroids), L, N, M, ksub, dsub, _p(out))
    return None if bad else out


def kmeans(x: torch.Tensor, mask: torch.Tensor | None, ksub: int, niter: int, seed: int = 0, tol: float = 0.0,
           threads: int = 1, init: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`pqflex.ops.portable.kmeans` with the Lloyd assignment in C, the ``L`` problems split over ``threads``
    threads (the C call releases the GIL). Each problem is summed by one thread in point order, so the result does
    not depend on ``threads``; it equals the reference up to float rounding of the distances (a near-tie can go to
    the other centroid)."""
    L, N, dsub = x.shape
    w = portable.kmeans_weights(x, mask).contiguous()
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
        return portable.lloyd(xf, w, ksub, niter, seed, tol, step, init)
    finally:
        if pool is not None:
            pool.shutdown()
