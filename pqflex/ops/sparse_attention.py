"""sparse_decode_attention: one query per sequence attends the listed tokens of its KV head, read by index.

Math (matches :func:`pqflex.ops.portable.sparse_decode_attention`, itself :func:`pqflex.ops.portable.
masked_attention` with the token bitmap of the list): for query head ``g`` of KV head ``h``,
``out[g] = sum_t p_t V[idx[t]]`` with ``p = softmax_t(scale * q_g . K[idx[t]])`` over the slots ``t`` with
``valid[t]`` and ``idx[t] >= 0``; a query whose list has no valid token gets zeros. A decode step passes its
selection without building a token list: ``spans`` (start, sink budget, recent budget per sequence), ``n`` and the
static widths ``sink`` and ``recent`` put the sink and recent slots around the ``W`` listed ones, and the kernels
compute those positions themselves (:func:`pqflex.ops.portable.decode_token_list` places them the same way).

The Triton kernel is flash-decoding over the list, with no compact copy of the listed rows: one program per
(sequence x KV head, split) takes a contiguous slice of the ``T`` slots, loads the ``G`` query heads of the KV head
as one ``[G_PAD, D]`` tile (``G_PAD >= 16`` rows for ``tl.dot``), gathers the keys and values of its slice by index
in blocks of ``BLOCK_T`` straight from the cache, and keeps a running max, sum and accumulator in fp32 (online
softmax, base 2). With one split it writes the output; otherwise each split writes a partial ``(m, l, acc)`` and a
second kernel combines the splits. The number of splits depends on shapes only (``T``, ``B * Hkv``, the SM count),
so a decode step compiles once and captures in a CUDA graph.

``BLOCK_T=64``, 4 warps, 2 stages was the fastest setting at every shape measured; prefetching the next block's
indices by hand gained nothing, and combining the splits in the last program of each KV head (an atomic counter
instead of the second kernel) was slower (``benchmarks/bench_sparse_attention.py``, BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import math

import torch

from pqflex.ops import native, portable

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton run plain torch
    triton = None

MAX_G = 16  # query heads per KV head of the kernel's query tile
MAX_D = 256
MAX_SPLITS = 128
PROGRAMS_PER_SM = 3  # default splits: B * Hkv * splits fills the GPU about this many times over
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check(query, key, value, idx, valid, scale, spans=None, n=None, sink=0, recent=0) -> None:
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query must be [B, H, 1, D] and key [B, Hkv, C, D], got {tuple(query.shape)} and "
                         f"{tuple(key.shape)}")
    B, H, S, D = query.shape
    Hkv = key.shape[1]
    if S != 1:
        raise ValueError(f"sparse decode attention takes one query per sequence, got S={S}")
    if key.shape[0] != B or key.shape[3] != D or H % Hkv:
        raise ValueError(f"key {tuple(key.shape)} does not fit query {tuple(query.shape)}: need [B, Hkv, C, D] "
                         f"with H % Hkv == 0")
    if value.shape != key.shape:
        raise ValueError(f"value {tuple(value.shape)} must have the shape of key {tuple(key.shape)}")
    if query.dtype not in FLOAT_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must share one dtype of {FLOAT_DTYPES}, got {query.dtype}, "
                        f"{key.dtype} and {value.dtype}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must be int32 or int64, got {idx.dtype}")
    if idx.dim() != 3 or idx.shape[:2] != (B, Hkv):
        raise ValueError(f"idx must be [B, Hkv, W] = [{B}, {Hkv}, W], got {tuple(idx.shape)}")
    for name, width in (("sink", sink), ("recent", recent)):
        if isinstance(width, bool) or not isinstance(width, (int, torch.SymInt)) or width < 0:
            raise ValueError(f"{name} must be an int >= 0 (slots), got {width!r}")
    if spans is None and (sink or recent):
        raise ValueError(f"sink={sink} and recent={recent} slots need spans (start, sink, recent per sequence)")
    if spans is not None and (spans.shape != (B, 3) or spans.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"spans must be an int tensor [B, 3] = [{B}, 3], got {spans.dtype} {tuple(spans.shape)}")
    if n is not None and (n.dim() != 0 or n.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"n must be a 0-d int tensor or None, got {n.dtype} {tuple(n.shape)}")
    if idx.shape[2] + sink + recent < 1:
        raise ValueError("the list is empty: idx has no slot and sink = recent = 0")
    if valid is not None:
        if valid.dtype != torch.bool:
            raise TypeError(f"valid must be bool or None, got {valid.dtype}")
        if valid.shape != idx.shape:
            raise ValueError(f"valid {tuple(valid.shape)} must have the shape of idx {tuple(idx.shape)}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    tensors = (query, key, value, idx) + tuple(t for t in (valid, spans, n) if t is not None)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"sparse_decode_attention inputs must be on one device, got {sorted(map(str, devices))}")


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs
    return torch.cuda.get_device_properties(device).multi_processor_count


def tokens_per_split(T: int, bh: int, block_t: int, device: torch.device, num_splits: int | None = None) -> int:
    """Listed slots per split, a multiple of ``block_t``: at most ``num_splits`` splits when asked for.

    By default the most blocks per split that still give ``PROGRAMS_PER_SM`` programs per SM (``bh = B * Hkv``
    programs per split), one block at least, at most ``MAX_SPLITS`` splits (one block of 64 slots per split was as
    fast as any split count measured; BENCHMARKS.md).
    """
    blocks = triton.cdiv(T, block_t)
    if num_splits is not None:
        return triton.cdiv(blocks, num_splits) * block_t
    want = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), bh)
    # sym_max: sizes symbolic under torch.compile's dynamic shapes stay symbolic (no guard, no recompile per length)
    return torch.sym_max(torch.sym_max(blocks // want, triton.cdiv(blocks, MAX_SPLITS)), 1) * block_t


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """``a @ b`` accumulated in fp32; exact fp32 products for fp32 inputs (tf32 would break the 2x rule)."""
        if IEEE:
            c = tl.dot(a, b, input_precision="ieee")
        else:
            c = tl.dot(a, b)
        return c

    @triton.jit
    def _list_block(idx_bh, valid_bh, t0, end, s_i_t, s_m_t, start, sink_end, recent_lo, n, SINK, W, RECENT,
                    BLOCK_T: tl.constexpr, HAS_VALID: tl.constexpr, HAS_SPANS: tl.constexpr):
        """Which slots of the block at ``t0`` are real, and their positions (int64; 0 elsewhere). With spans, slot
        ``t`` is the sink position ``start + t`` (``t < SINK``), listed slot ``t - SINK`` (``< W``), or the recent
        position ``n - RECENT + t - SINK - W``."""
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < end
        j = t - SINK if HAS_SPANS else t  # the listed slot
        listed = ok & (j >= 0) & (j < W)
        pos = tl.load(idx_bh + j * s_i_t, mask=listed, other=-1).to(tl.int64)
        real = listed & (pos >= 0)
        if HAS_VALID:
            real = real & tl.load(valid_bh + j * s_m_t, mask=listed, other=0).to(tl.int1)
        if HAS_SPANS:
            sink_pos = start + t
            recent_pos = n - RECENT + (j - W)
            real = real | (ok & (t < SINK) & (sink_pos < sink_end)) | (ok & (j >= W) & (recent_pos >= recent_lo))
            pos = tl.where(t < SINK, sink_pos, tl.where(j < W, pos, recent_pos))
        return real, tl.where(real, pos, 0)

    @triton.jit
    def _sparse_decode_attention_kernel(
            q_ptr, k_ptr, v_ptr, idx_ptr, valid_ptr, spans_ptr, n_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
            Hkv, T, D, split_tokens, num_splits, qk_scale, n_keys, SINK, W, RECENT,
            s_q_b, s_q_h, s_k_b, s_k_h, s_k_n, s_v_b, s_v_h, s_v_n, s_i_b, s_i_h, s_i_t, s_m_b, s_m_h, s_m_t,
            s_sp_b, s_sp_c,
            G: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
            HAS_VALID: tl.constexpr, HAS_SPANS: tl.constexpr, HAS_N: tl.constexpr, SPLIT: tl.constexpr,
            IEEE: tl.constexpr):
        """Online softmax of the G query heads of one KV head over one slice of its ``T`` slots."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = (pid // Hkv).to(tl.int64)
        h = (pid % Hkv).to(tl.int64)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        g_ok = g < G
        d_ok = d < D
        q = tl.load(q_ptr + b * s_q_b + (h * G + g)[:, None] * s_q_h + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [G_PAD, D_PAD]
        k_bh = k_ptr + b * s_k_b + h * s_k_h
        v_bh = v_ptr + b * s_v_b + h * s_v_h
        idx_bh = idx_ptr + b * s_i_b + h * s_i_h
        valid_bh = valid_ptr + b * s_m_b + h * s_m_h
        if HAS_N:
            n = tl.load(n_ptr).to(tl.int64)
        else:
            n = n_keys.to(tl.int64)
        if HAS_SPANS:  # the sink [start, sink_end) and the recent window [recent_lo, n) of this sequence
            start = tl.load(spans_ptr + b * s_sp_b).to(tl.int64)
            sink_budget = tl.load(spans_ptr + b * s_sp_b + s_sp_c).to(tl.int64)
            recent_budget = tl.load(spans_ptr + b * s_sp_b + 2 * s_sp_c).to(tl.int64)
            sink_end = tl.minimum(start + sink_budget, n)
            recent_lo = tl.maximum(tl.maximum(n - recent_budget, start + sink_budget), 0)
        else:
            start = n * 0
            sink_end = start
            recent_lo = n

        m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)  # running max of the base-2 logits
        l_i = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
        first = split * split_tokens
        end = tl.minimum(first + split_tokens, T)
        for t0 in range(first, end, BLOCK_T):
            ok, pos = _list_block(idx_bh, valid_bh, t0, end, s_i_t, s_m_t, start, sink_end, recent_lo, n, SINK, W,
                                  RECENT, BLOCK_T, HAS_VALID, HAS_SPANS)  # once for K and V
            kv_ok = ok[:, None] & d_ok[None, :]
            k = tl.load(k_bh + pos[:, None] * s_k_n + d[None, :], mask=kv_ok, other=0.0)  # [BLOCK_T, D_PAD]
            v = tl.load(v_bh + pos[:, None] * s_v_n + d[None, :], mask=kv_ok, other=0.0)
            s = _dot(q, tl.trans(k), IEEE)  # [G_PAD, BLOCK_T] fp32
            s = tl.where(ok[None, :], (s * qk_scale).to(tl.float32), float("-inf"))  # scale is fp64 under inductor
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid token yet: keep exp2 away from NaN
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new

        row = pid * G + g  # = b * H + h * G + g
        if SPLIT:
            part = row * num_splits + split
            tl.store(m_ptr + part, m_i, mask=g_ok)
            tl.store(l_ptr + part, l_i, mask=g_ok)
            tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
        else:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # nothing valid: acc is 0
            tl.store(out_ptr + row[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=g_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _sparse_decode_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, D, num_splits,
                                      S_PAD: tl.constexpr, D_PAD: tl.constexpr):
        """Merge the partial (max, sum, accumulator) of every split of one query head and write its output."""
        row = tl.program_id(0)
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D_PAD)
        s_ok = s < num_splits
        d_ok = d < D
        m = tl.load(m_ptr + row * num_splits + s, mask=s_ok, other=float("-inf"))
        l = tl.load(l_ptr + row * num_splits + s, mask=s_ok, other=0.0)
        acc = tl.load(acc_ptr + (row * num_splits + s)[:, None] * D + d[None, :],
                      mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # [S_PAD, D_PAD]
        m_max = tl.max(m, axis=0)
        w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # 0 for splits with no valid token
        l_sum = tl.sum(w * l, axis=0)
        out = tl.sum(w[:, None] * acc, axis=0) / tl.where(l_sum > 0, l_sum, 1.0)
        tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def sparse_decode_attention_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor,
                                   valid: torch.Tensor | None, scale: float, spans: torch.Tensor | None = None,
                                   n: torch.Tensor | None = None, sink: int = 0, recent: int = 0,
                                   num_splits: int | None = None, block_t: int | None = None, num_warps: int = 4,
                                   num_stages: int = 2) -> torch.Tensor:
    """Launch the Triton kernels (same contract as :func:`pqflex.ops.portable.sparse_decode_attention`).

    ``num_splits`` (default: from ``T``, ``B * Hkv`` and the SM count), ``block_t`` (default 64; 32 for fp32),
    ``num_warps`` and ``num_stages`` are tuning knobs for benchmarks and tests; none of them changes the result
    beyond float rounding.
    """
    _check(query, key, value, idx, valid, scale, spans, n, sink, recent)
    B, H, _, D = query.shape
    Hkv, W = idx.shape[1], idx.shape[2]
    T = sink + W + recent
    G = H // Hkv
    if G > MAX_G or D > MAX_D:
        raise ValueError(f"sparse_decode_attention_triton needs G <= {MAX_G} and D <= {MAX_D}, got G={G}, D={D}")
    block_t = block_t or (32 if query.dtype == torch.float32 else 64)
    if block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"block_t={block_t} must be a power of two >= 16")
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits={num_splits} is out of range [1, {MAX_SPLITS}]")
    split_tokens = tokens_per_split(T, B * Hkv, block_t, query.device, num_splits)
    num_splits = triton.cdiv(T, split_tokens)  # no empty split; at most MAX_SPLITS
    # Under torch.compile with dynamic shapes (a recompile for another prompt length or batch size) the split
    # count is symbolic: the compile-time constants take their bounds, so one graph serves every length.
    concrete = isinstance(num_splits, int)
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out = torch.empty(B, H, 1, D, dtype=query.dtype, device=query.device)
    # Partials [B * H, num_splits] and [B * H, num_splits, D], flat: a symbolic dim of a multi-dim buffer would make
    # inductor specialize on its being 1 (one more graph for short lists).
    m = torch.empty(B * H * num_splits, dtype=torch.float32, device=query.device)
    l = torch.empty_like(m)
    acc = torch.empty(B * H * num_splits * D, dtype=torch.float32, device=query.device)
    mask = idx if valid is None else valid  # placeholder pointers where there is no mask, no spans, no n
    spans_t = idx if spans is None else spans
    n_t = idx if n is None else n
    d_pad = max(16, triton.next_power_of_2(D))
    s_pad = triton.next_power_of_2(num_splits) if concrete else MAX_SPLITS
    split = num_splits > 1 if concrete else True  # one split through the combine kernel is still exact
    launch = torch.library.wrap_triton
    launch(_sparse_decode_attention_kernel)[(B * Hkv, num_splits)](
        query, key, value, idx, mask, spans_t, n_t, out, m, l, acc,
        Hkv, T, D, split_tokens, num_splits, float(scale) * math.log2(math.e), key.shape[2], sink, W, recent,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), idx.stride(0), idx.stride(1), idx.stride(2),
        mask.stride(0), mask.stride(1), mask.stride(2), spans_t.stride(0), spans_t.stride(1),
        G=G, G_PAD=max(16, triton.next_power_of_2(G)), D_PAD=d_pad, BLOCK_T=block_t,
        HAS_VALID=valid is not None, HAS_SPANS=spans is not None, HAS_N=n is not None, SPLIT=split,
        IEEE=query.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    if split:
        launch(_sparse_decode_combine_kernel)[(B * H,)](
            m, l, acc, out, D, num_splits, S_PAD=s_pad, D_PAD=d_pad, num_warps=4 if s_pad <= 64 else 8)
    return out


@torch.library.triton_op("pqflex::sparse_decode_attention", mutates_args=())
def sparse_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor,
                            valid: torch.Tensor | None, scale: float, spans: torch.Tensor | None = None,
                            n: torch.Tensor | None = None, sink: int = 0, recent: int = 0) -> torch.Tensor:
    """``torch.ops.pqflex.sparse_decode_attention``: Triton on CUDA (plain torch for G > 16 or D > 256), the native
    C kernel or plain torch on the CPU. Arguments as :func:`pqflex.ops.portable.sparse_decode_attention`; ``query``
    may be any view with a unit last stride (transformers passes ``[B, S, H, D]`` transposed)."""
    _check(query, key, value, idx, valid, scale, spans, n, sink, recent)
    G, D = query.shape[1] // key.shape[1], query.shape[3]
    # The device test also keeps torch.compile on the CPU tracing plain torch instead of Triton kernels.
    if triton is None or query.device.type != "cuda" or G > MAX_G or D > MAX_D:
        return portable.sparse_decode_attention(query, key, value, idx, valid, scale, spans, n, sink, recent)
    return sparse_decode_attention_triton(query, key, value, idx, valid, scale, spans, n, sink, recent)


def reads_spans(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether a kernel serves the op for these inputs and reads the sink and recent spans itself (the Triton kernel
    on CUDA, the C kernel for fp32 on the CPU, eager), rather than plain torch, which lists every slot: a dense step
    then costs what its rows cost."""
    if query.device.type == "cuda":
        return triton is not None and query.shape[1] // key.shape[1] <= MAX_G and query.shape[3] <= MAX_D
    # Compiled on the CPU, the op is traced through its plain-torch body.
    return query.device.type == "cpu" and not torch.compiler.is_compiling() and native.usable(query)


def _sparse_decode_attention_cpu(query, key, value, idx, valid, scale, spans=None, n=None, sink=0, recent=0):
    _check(query, key, value, idx, valid, scale, spans, n, sink, recent)
    if native.usable(query):  # fp32: read the rows by index in C, the sink and recent ranges from spans
        return native.sparse_decode_attention(query, key, value, idx, valid, scale, spans, n, sink, recent)
    return portable.sparse_decode_attention(query, key, value, idx, valid, scale, spans, n, sink, recent)


native.register_cpu("sparse_decode_attention", _sparse_decode_attention_cpu)
