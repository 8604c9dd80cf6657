"""Measuring for ``pqflex bench``: the presets (random-weight models of real shapes), one row of the sweep (TTFT and TPOT
of a decode loop, through ``generate()``, the attention of one layer) and the timing tools."""

from __future__ import annotations

import dataclasses
import gc
import os
import re
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F


METHODS = ("pqcache", "pqcache-offload", "pqflex-dense", "flashinfer", "sdpa-static", "sdpa")
COMPILED = {"pqcache", "pqcache-offload", "pqflex-dense", "flashinfer", "sdpa-static"}
PQ_METHODS = {"pqcache", "pqcache-offload", "pqflex-dense"}  # attention "pqcache"
DENSE_METHODS = ("pqflex-dense", "flashinfer", "sdpa-static", "sdpa")  # every token attended: one row, any budget


def attention_of(method: str) -> str:
    """The attention implementation a method's model is built with."""
    if method == "flashinfer":
        from pqflex.harness.bench_flashinfer import ATTN

        return ATTN
    return "pqcache" if method in PQ_METHODS else "sdpa"


_COMMON = dict(hidden_act="silu", rms_norm_eps=1e-5, eos_token_id=None, bos_token_id=None, pad_token_id=None)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the --dtype choices


PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.1-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                   head_dim=128, max_position_embeddings=131072, rope_theta=500000.0)),
    "mistral-7b": ("mistral", dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                   head_dim=128, max_position_embeddings=131072, rope_theta=1000000.0,
                                   sliding_window=None)),
    "qwen2.5-7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                 max_position_embeddings=131072, rope_theta=1000000.0, use_sliding_window=False)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
                                   tie_word_embeddings=True)),
    "tiny": ("llama", dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                           max_position_embeddings=16384)),
    "llama-3.1-70b": ("llama", dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                    num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                                    head_dim=128, max_position_embeddings=131072, rope_theta=500000.0)),
}


@dataclasses.dataclass
class Result:
    """One row: rank 0's times; under TP, ``kv_gib`` and ``peak_gib`` are rank 0's (its shard of the heads) and
    ``peak_gib_ranks`` has every rank's peak. ``error`` says why a row has no times (``"out of memory"``)."""

    preset: str
    method: str
    batch: int
    context: int
    budget: float | int
    ttft_s: float
    tpot_ms: float
    attn_layer_us: float | None
    peak_gib: float | None
    steps: int
    gen_ttft_s: float | None = None  # through model.generate(), per-token timestamps
    gen_tpot_ms: float | None = None
    kv_gib: float | None = None  # key/value state on the device: dense buffers, or offload's GPU rows + PQ state
    hit_rate: float | None = None  # offload: hot-cache hits per selected token over the timed run
    cache_setup_s: float | None = None  # creating the cache (offload: allocating and registering CPU memory)
    tp: int = 1  # tensor-parallel ranks
    peak_gib_ranks: list[float | None] | None = None  # peak GPU memory of every rank (TP only)
    error: str | None = None
    prefill_chunk: int | None = None  # tokens per prefill forward (None: the whole prompt in one)
    compiled: bool | None = None  # the decode loop ran torch.compile'd (False: eager, --eager)
    graphed: bool | None = None  # decode steps replayed from a pqflex.DecodeGraph (--graphed)
    step_gb: float | None = None  # bytes a decode step must read at least (decode_step_bytes), in GB
    floor_ms: float | None = None  # step_gb at the device's measured copy bandwidth: no decode step is faster
    breakdown: dict[str, float] | None = None  # --profile on CUDA: a step's GPU time by kind (kernel_breakdown)
    gen_breakdown: dict[str, float] | None = None  # the same for a step of generate(), token to token


def model_config(preset: str):
    """The transformers config of a preset (raises ``ValueError`` naming the allowed presets)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {sorted(PRESETS)}")
    from transformers import AutoConfig

    model_type, fields = PRESETS[preset]
    return AutoConfig.for_model(model_type, **_COMMON, **fields)


def build_model(preset: str, attn: str, dtype: torch.dtype, device: str):
    """A random-weight model of the preset's shape, built directly on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(preset), attn_implementation=attn, dtype=dtype)
    return model.eval()


def prompt_ids(vocab: int, batch: int, context: int, device: str, seed: int) -> torch.Tensor:
    """Random token ids ``[batch, context]`` from a generator seeded with ``seed`` on ``device``."""
    return torch.randint(0, vocab, (batch, context), device=device,
                         generator=torch.Generator(device=device).manual_seed(seed))


def decode_step_bytes(model, method: str, batch: int, context: int, budget, options: dict[str, Any]) -> dict:
    """The bytes one decode step at ``context`` cached tokens must read at least, by kind: every weight once
    (``weights``; under tensor parallelism, one rank's share), the keys and values it attends (``kv``: all of them
    for the dense methods; the budget's sink + top-k + recent rows for pqcache), and the PQ state it scores
    (``index``: one uint8 code per sub-space of every cached token, each KV head's fp32 centroids). Writes (the new
    token's key and value, activations) and the logits are left out: they are small beside these."""
    from pqflex import PQConfig

    cfg = model.config
    tp = getattr(model, "tp_size", None) or 1
    layers, hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = model.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / tp
    heads = layers * batch * hkv / tp  # KV heads of the whole step, one rank's share
    out = {"weights": weights, "kv": 0.0, "index": 0.0}
    pq = PQConfig(**{**options, "budget": shown_budget(method, budget)})
    b = pq.resolve_budget(context)
    if b.dense:
        out["kv"] = heads * 2 * context * D * elem
        return out
    rows = min(context, b.sink_size + b.topk + b.recent_size)
    out["kv"] = heads * 2 * rows * D * elem
    if pq.scorer == "pq":
        out["index"] = heads * (context * pq.M + (1 << pq.nbits) * D * 4)
    else:  # the oracle scores every key itself
        out["index"] = heads * context * D * elem
    return out


def copy_bandwidth(device: str, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Bytes a second that a plain copy moves on ``device`` (read plus write, median of ``reps`` copies of
    ``nbytes``): the bandwidth a decode step's byte floor is computed at (below the card's peak, reached)."""
    if not device.startswith("cuda"):
        nbytes = min(nbytes, 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def graph_time_us(fn, replays: int = 200) -> float:
    """Median time of one call of ``fn`` on CUDA, from CUDA-graph replays of 10 calls each."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    times = []
    for _ in range(replays // 10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / 10)
    return statistics.median(times)


def layer_attention_us(preset: str, method: str, batch: int, context: int, budget, dtype: torch.dtype,
                       options: dict[str, Any] | None = None, tp: int = 1) -> float:
    """Decode attention time of one layer at ``context`` tokens (CUDA only): the method's whole attention step.

    ``options``: further :class:`pqflex.PQConfig` settings of the pqcache methods (backend, selection, ...).
    ``tp``: tensor-parallel ranks; the step runs over one rank's heads.
    """
    from pqflex import PQConfig, PQIndex, ResidentKV, attention_backend

    cfg = model_config(preset)
    Hkv, H = cfg.num_key_value_heads // tp, cfg.num_attention_heads // tp
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cap = -(-(context + 1) // 128) * 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, H, 1, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(batch, Hkv, cap, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(batch, Hkv, cap, D, device="cuda", dtype=dtype, generator=g)
    scale = D ** -0.5
    if method == "flashinfer":
        from pqflex.harness.bench_flashinfer import layer_decode_us

        return layer_decode_us(q, k, v, context)
    if method.startswith("sdpa"):
        kk, vv = k[:, :, :context], v[:, :, :context]
        return graph_time_us(lambda: F.scaled_dot_product_attention(q, kk, vv, scale=scale, enable_gqa=True))
    pq = PQConfig(budget=1.0 if method == "pqflex-dense" else budget, niter=10, **(options or {}))
    index = PQIndex.build(k[:, :, :context - 1], pq, capacity=cap)
    n = torch.tensor(context, device="cuda")

    torch._dynamo.reset()  # each call compiles a new closure of the same code object

    kv = ResidentKV(k, v, attention_backend(pq))

    def step():  # what PQLayer.step runs for a fixed-capacity cache: append, plan, attend
        index.append(k.index_select(2, (n - 1).reshape(1)), n - 1)
        return kv.attend(q, index.plan(q, n, scale), scale)

    return graph_time_us(torch.compile(step, fullgraph=True, dynamic=False))


def run_method(preset: str, method: str, batch: int, context: int, budget, new_tokens: int, warmup: int,
               dtype: torch.dtype, device: str, options: dict[str, Any] | None = None, model=None,
               prefill_chunk: int | None = None, compile: bool = True, profile: str | None = None,
               graphed: bool = False) -> Result:
    """Prefill ``context`` random tokens, then decode ``warmup + new_tokens`` steps; time TTFT and TPOT.

    ``prefill_chunk`` tokens per prefill forward (``None``: the whole prompt in one), as ``generate()``'s
    ``prefill_chunk_size``: activations then scale with the chunk, not the prompt, so the caches bound what fits.
    ``compile=False`` decodes the :data:`COMPILED` methods eagerly too (no compile time: capacity and TTFT rows).
    ``profile`` (a directory): after the timed steps, 3 more under ``torch.profiler`` (CPU, and CUDA on a GPU),
    written there as a Chrome trace and a table of the ops by self host time, one pair per rank.
    ``graphed``: the compiled methods decode through a :class:`pqflex.DecodeGraph` (on CUDA: its first warm-up step
    compiles, its second captures the CUDA graph, the timed steps replay it without Dynamo's guards); with
    ``compile=False`` it captures the eager step (no compile time).
    """
    import pqflex
    from pqflex import CACHE_KWARG
    from transformers import DynamicCache, StaticCache

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {METHODS}")
    attn = attention_of(method)
    model = model if model is not None else build_model(preset, attn, dtype, device)
    capacity = context + warmup + new_tokens + 1
    t0 = time.perf_counter()
    if attn == "pqcache":
        pq = pqflex.PQConfig(budget=1.0 if method == "pqflex-dense" else budget, **(options or {}))
        pqflex.configure(model, pq.replace(offload=False))  # the warm-up below uses a growing cache
        cache = pqflex.PQStaticCache(model, capacity, cache_config(method, pq), max_batch_size=batch)
    elif method in ("sdpa-static", "flashinfer"):
        if method == "flashinfer":  # whole pages of FlashInfer's paged view
            from pqflex.harness.bench_flashinfer import pages_capacity

            capacity = pages_capacity(capacity)
        cache = StaticCache(config=model.config, max_cache_len=capacity)
    else:
        cache = DynamicCache(config=model.config)
    planner = None
    if method == "flashinfer":  # FlashInfer's decode over the StaticCache, planned on the host before each step
        from pqflex.harness.bench_flashinfer import FlashInferDecode

        planner = FlashInferDecode.for_model(model, batch, capacity)
    setup = time.perf_counter() - t0
    compiled = compile and method in COMPILED
    graphed = graphed and method in COMPILED
    if graphed and warmup < 2:
        raise ValueError(f"a graphed decode needs warmup >= 2 (a compiling step and a capturing one), got {warmup}")
    if graphed:
        decode = pqflex.DecodeGraph(model, cache, compile=compiled)
    else:
        mode = "reduce-overhead" if device.startswith("cuda") else None
        forward = torch.compile(model.forward, fullgraph=True, dynamic=False, mode=mode) if compiled else model.forward

        def decode(token: torch.Tensor) -> torch.Tensor:
            return forward(token, **{CACHE_KWARG: cache}, logits_to_keep=1).logits
    if planner is not None:
        unplanned = decode

        def decode(token: torch.Tensor) -> torch.Tensor:  # the host plans each step before it runs
            planner.advance()
            return unplanned(token)
    tree = compiled and not graphed and device.startswith("cuda")  # CUDA-graph trees: mark each step
    ids = prompt_ids(model.config.vocab_size, batch, context, device, seed=0)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        # Warm-up prefill and one step (kernel JIT, cuBLAS handles, the index build's Triton kernels), not timed.
        warm = DynamicCache(config=model.config)
        model(ids[:, :min(context, 2048)], **{CACHE_KWARG: warm}, logits_to_keep=1)
        model(ids[:, :1], **{CACHE_KWARG: warm}, logits_to_keep=1)
        _sync(device)
        t0 = time.perf_counter()
        chunk = prefill_chunk or context
        for start in range(0, context, chunk):
            logits = model(ids[:, start:start + chunk], **{CACHE_KWARG: cache}, logits_to_keep=1).logits
        _sync(device)
        ttft = time.perf_counter() - t0
        token = logits[:, -1:].argmax(-1)
        if planner is not None:
            planner.start(context)
        times = []
        for step in range(warmup + new_tokens):
            if tree:
                torch.compiler.cudagraph_mark_step_begin()
            _sync(device)
            t0 = time.perf_counter()
            token = decode(token)[:, -1:].argmax(-1)
            _sync(device)
            if step >= warmup:
                times.append(time.perf_counter() - t0)
        breakdown = None
        if profile:
            name = f"{preset}_{method}_b{batch}_n{context}_rank{_rank()}"
            token, breakdown = profile_steps(lambda t: decode(t)[:, -1:].argmax(-1), token, tree, device,
                                             os.path.join(profile, name))
    if planner is not None:
        planner.close()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None
    kv, hits = cache_stats(cache)
    return Result(preset, method, batch, context, shown_budget(method, budget), ttft, statistics.median(times) * 1e3,
                  None, peak, len(times), kv_gib=kv, hit_rate=hits, cache_setup_s=setup,
                  tp=getattr(model, "tp_size", None) or 1, prefill_chunk=prefill_chunk, compiled=compiled,
                  graphed=graphed, breakdown=breakdown)


PQ_KERNELS = ("_pq_", "_sparse_decode_", "_offload_gather")  # the Triton kernels of pqflex's ops (name prefixes)
GEMM_KERNELS = re.compile(r"gemm|gemv|nvjet|xmma|cutlass|cublas|splitkreduce", re.IGNORECASE)  # cuBLAS, CUTLASS
# Other libraries' attention kernels: FlashInfer's decode and merge, SDPA's flash / memory-efficient / cuDNN ones.
ATTN_KERNELS = re.compile(r"BatchDecode|SingleDecode|MergeStates|flashinfer|flash_fwd|fmha|cudnn|attention",
                          re.IGNORECASE)


def kernel_breakdown(kernels: list[tuple[str, float, float]], steps: int, wall_ms: float) -> dict[str, float]:
    """Where ``steps`` decode steps that took ``wall_ms`` in all spent the GPU, per step: ``gemm_ms`` (cuBLAS and
    CUTLASS matmuls), ``pq_ms`` (pqflex's kernels), ``attn_ms`` (other libraries' attention kernels), ``other_ms``
    (every other kernel: norms, RoPE, cache writes, inductor's fused elementwise ones), ``idle_ms`` (no kernel
    running: launch gaps, host work, syncs) and the ``kernels`` launched. ``kernels``: ``(name, start_us, end_us)`` of each GPU kernel; kernels running at once
    count once towards the busy time."""
    out = {"gemm_ms": 0.0, "pq_ms": 0.0, "attn_ms": 0.0, "other_ms": 0.0}
    busy, reach = 0.0, float("-inf")
    for name, start, end in sorted(kernels, key=lambda k: k[1]):
        kind = ("pq_ms" if name.lstrip().startswith(PQ_KERNELS) else "gemm_ms" if GEMM_KERNELS.search(name) else
                "attn_ms" if ATTN_KERNELS.search(name) else "other_ms")
        out[kind] += (end - start) / 1e3
        busy += max(0.0, end - max(start, reach))  # the union of the kernels' intervals
        reach = max(reach, end)
    out = {k: v / steps for k, v in out.items()}
    out["idle_ms"] = max(0.0, wall_ms - busy / 1e3) / steps
    out["kernels"] = len(kernels) / steps
    return out


def profile_steps(step, token: torch.Tensor, graphs: bool, device: str, path: str,
                  steps: int = 3) -> tuple[torch.Tensor, dict[str, float] | None]:
    """``steps`` decode steps (``token = step(token)``) under ``torch.profiler``: ``path.json`` (Chrome trace) and
    ``path.txt`` (ops by self host time). Returns the last token and, on CUDA, :func:`kernel_breakdown` of the
    steps."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.profiler.record_function("pqflex_decode_step"):
                token = step(token)
                _sync(device)
    return token, profile_outputs(prof, path, device, lambda name: name == "pqflex_decode_step")


def profile_outputs(prof, path: str, device: str, is_step) -> dict[str, float] | None:
    """Write a finished profile's Chrome trace (``path.json``) and its ops by self host time (``path.txt``); on
    CUDA return :func:`kernel_breakdown` of its steps (the host ranges whose name ``is_step``)."""
    prof.export_chrome_trace(path + ".json")
    with open(path + ".txt", "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    if not device.startswith("cuda"):
        return None
    events = prof.events()
    steps = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and is_step(e.name)]
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA and not is_step(e.name)]
    return kernel_breakdown(kernels, max(1, len(steps)), sum(e.time_range.elapsed_us() for e in steps) / 1e3)


def shown_budget(method: str, budget: float | int) -> float | int:
    """The budget a row reports: 1.0 for the methods that attend to every token."""
    return 1.0 if method in DENSE_METHODS else budget


def cache_config(method: str, config):
    """The :class:`pqflex.PQConfig` of a method's cache (offload on for ``pqcache-offload``)."""
    return config.replace(offload=method == "pqcache-offload")


def cache_stats(cache) -> tuple[float, float | None]:
    """GiB of key/value state on the device and, for an offloaded cache, the hot-cache hit rate (syncs)."""
    import pqflex

    if isinstance(cache, pqflex.PQStaticCache):
        stores = [layer.store for layer in cache.pq_layers if layer.store is not None]
        hits = sum(int(s.hits) for s in stores) / max(1, sum(int(s.lookups) for s in stores)) if stores else None
        return (cache.kv_device_nbytes + cache.pq_nbytes) / 2 ** 30, hits
    kv = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in cache.layers
             if getattr(layer, "keys", None) is not None)
    return kv / 2 ** 30, None


class _Stamps:
    """A logits processor that synchronizes and stamps the time of every generated token (it changes nothing);
    with a profiler, it also steps the profiler's schedule once a token."""

    def __init__(self, device: str, profiler=None) -> None:
        self.device, self.times, self.profiler = device, [], profiler

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        self.times.append(time.perf_counter())
        if self.profiler is not None:
            self.profiler.step()
        return scores


def run_generate(model, method: str, batch: int, context: int, new_tokens: int, warmup: int,
                 device: str, prefill_chunk: int | None = None, profile: str | None = None,
                 graphed: bool = False) -> tuple[float, float, dict[str, float] | None]:
    """TTFT (s) and TPOT (ms, median over the tokens after ``warmup``) of ``model.generate()`` as users call it.

    ``model`` is configured for the method already (:func:`run_method` did it). Greedy, ``min_new_tokens`` fixed.
    The offload method's cache takes the model's settings with ``offload=True``. ``profile`` (a path without
    extension): one more ``generate()`` afterwards, its 3 tokens after the warm-up under ``torch.profiler``
    (:func:`profile_outputs`: trace, table and, on CUDA, the breakdown returned third, else None).
    ``graphed``: the pqcache methods' ``PQStaticCache(graph=True)``: decode steps replay the cache's DecodeGraph.
    """
    ids = prompt_ids(model.config.vocab_size, batch, context, device, seed=1)
    stamps = _Stamps(device)
    # new_tokens timed gaps after the warm-up: one token more than the gaps (the first token is the prefill's)
    ttft = _generate(model, method, batch, ids, warmup + new_tokens + 1, device, prefill_chunk, stamps, graphed)
    steps = [b - a for a, b in zip(stamps.times, stamps.times[1:])][warmup:]
    breakdown = None
    if profile:
        from torch.profiler import ProfilerActivity, schedule

        os.makedirs(os.path.dirname(profile) or ".", exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        # The schedule steps at each token: the steps recorded are whole generate() iterations, token to token.
        with torch.profiler.profile(activities=activities, schedule=schedule(wait=warmup, warmup=1, active=3,
                                                                            repeat=1)) as prof:
            _generate(model, method, batch, ids, warmup + 5, device, prefill_chunk, _Stamps(device, prof), graphed)
        breakdown = profile_outputs(prof, profile, device, lambda name: name.startswith("ProfilerStep#"))
    return ttft, statistics.median(steps) * 1e3, breakdown


def _generate(model, method: str, batch: int, ids: torch.Tensor, n: int, device: str, prefill_chunk: int | None,
              stamps: _Stamps, graphed: bool = False) -> float:
    """``n`` tokens of greedy ``model.generate()`` with the method's cache, ``stamps`` as its logits processor;
    returns the time to the first token (s)."""
    import pqflex
    from transformers import LogitsProcessorList

    capacity = ids.shape[1] + n + 1
    kwargs: dict[str, Any] = {}
    if method in PQ_METHODS:
        kwargs[pqflex.CACHE_KWARG] = pqflex.PQStaticCache(model, capacity, cache_config(
            method, pqflex.get_config(model)), max_batch_size=batch, graph=graphed)  # offload: CPU memory here
    elif method == "sdpa-static":
        kwargs["cache_implementation"] = "static"
    if prefill_chunk:
        kwargs["prefill_chunk_size"] = prefill_chunk
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, logits_processor=LogitsProcessorList([stamps]), **kwargs)
    return stamps.times[0] - t0


def device_and_dtype(args) -> tuple[str, torch.dtype]:
    """The ``--device`` (default: CUDA when there is one) and ``--dtype`` of a command."""
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu"), DTYPES[args.dtype]


def measure(args, method: str, batch: int, context: int, model, device: str, dtype: torch.dtype,
            options: dict[str, Any], bandwidth: float | None = None, budget: float | int | None = None) -> Result:
    """One row of the sweep: :func:`run_method`, then (unless switched off) :func:`run_generate` and
    :func:`layer_attention_us`; with ``bandwidth`` (bytes a second, :func:`copy_bandwidth`) the row's byte floor.
    ``budget``: the pqcache methods' budget (None: ``args.budget``)."""
    chunk = args.prefill_chunk
    budget = args.budget if budget is None else budget
    r = run_method(args.preset, method, batch, context, budget, args.new_tokens, args.warmup, dtype, device,
                   options, model=model, prefill_chunk=chunk, compile=not args.eager, profile=args.profile,
                   graphed=args.graphed)
    if not args.no_generate and method != "flashinfer":  # generate() cannot plan FlashInfer before each step
        path = None if args.profile is None else os.path.join(
            args.profile, f"{args.preset}_{method}_b{batch}_n{context}_rank{_rank()}_generate")
        r.gen_ttft_s, r.gen_tpot_ms, r.gen_breakdown = run_generate(
            model, method, batch, context, args.new_tokens, args.warmup, device, prefill_chunk=chunk, profile=path,
            graphed=args.graphed and not args.eager)
    if device.startswith("cuda") and not args.no_layer_attention and method != "pqcache-offload":
        r.attn_layer_us = layer_attention_us(args.preset, method, batch, context, budget, dtype, options, r.tp)
    step = sum(decode_step_bytes(model, method, batch, context, budget, options).values())
    r.step_gb = step / 1e9
    r.floor_ms = None if bandwidth is None else step / bandwidth * 1e3
    return r


def free_memory(device: str) -> None:
    """Release what a finished or failed run left: objects in reference cycles, compiled graphs (and their CUDA
    graph pools), then cached blocks."""
    gc.collect()
    torch._dynamo.reset()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0

