"""``pqflex bench``: decode speed of pqcache against dense attention on random-weight models of real shapes.

Speed does not depend on the weights, so each preset builds its model from a config (no download). Methods:

- ``pqcache``: attention ``"pqcache"`` with a :class:`pqflex.PQStaticCache`, decode step compiled;
- ``pqcache-offload``: the same with ``offload=True``: keys and values in CPU memory, the GPU holding the
  sink, the recent window, the hot-token cache and the PQ state (:class:`pqflex.OffloadedKV`);
- ``pqflex-dense``: the same machinery with ``budget=1.0`` (every token attended);
- ``sdpa-static``: transformers' SDPA with its ``StaticCache``, decode step compiled;
- ``sdpa``: transformers' SDPA with its ``DynamicCache``, eager.

Compiled steps use ``torch.compile(fullgraph=True, dynamic=False)``, with CUDA graphs (``mode="reduce-overhead"``)
on CUDA; with ``--graphed`` they go through a :class:`pqflex.DecodeGraph` instead (the compiled step captured once
and replayed without Dynamo's per-step guard checks). Reported: TTFT (the prefill forward, index build included),
TPOT (median of the timed decode steps after the warm-up steps), the decode attention time of one layer at that
context (a CUDA-graphed micro-benchmark of the method's attention step; dense SDPA for the sdpa methods), peak GPU
memory, card and versions; and TTFT and TPOT as a user sees them, through ``model.generate()`` with a timestamp at every token (:func:`run_generate`:
generate compiles the static caches' decode step itself, with CUDA graphs on CUDA).

What fits: ``--batch`` with ``--prefill-chunk N`` (the prompt in ``N``-token forwards, as ``generate()``'s
``prefill_chunk_size``, so a long prompt's activations do not decide the batch) and ``--eager`` (a decode loop
without compile time). ``--profile DIR`` traces 3 more decode steps of each row with ``torch.profiler``.

``--tp N`` measures the same methods with the model sharded over ``N`` ranks by transformers' own tensor
parallelism, the way users run it: ``from_pretrained(path, tp_plan="auto")`` under ``torchrun``. Without a launcher
the bench starts one (:func:`launch`: ``torch.distributed.run --standalone``, ``N`` local processes). Rank 0 writes
a stub checkpoint (the preset's config and one small tensor, :func:`write_stub_checkpoint`); every rank loads it and
transformers initializes the missing weights randomly, each rank only its own shard on its own device, so the whole
model never exists in one process. Every rank runs every step (decode steps compiled as above; on the CPU the
compiled step runs with gloo's all-reduces in the graph, checked with transformers 5.17 and 5.24); rank 0's times
are reported, memory is reported per rank, and only rank 0 prints and writes files.

An out-of-memory error in one method and context is recorded as a row (``error="out of memory"``, times NaN, shown
as OOM) and the sweep goes on. Under TP each rank catches its own error, then the ranks all-reduce a failure flag
so that all of them record the OOM. Limitation: an OOM on some ranks only, before a collective that the others then
enter (the model's all-reduces, in every forward), leaves the collectives unpaired: the failed ranks' flag meets the
others' all-reduce of activations. gloo then aborts a rank (seen on the CPU), nccl waits until the process group's
timeout; either way ``torchrun`` stops every rank and the sweep ends there (``--json`` keeps the rows before). Ranks
hold equal shards and run the same shapes, so an OOM normally strikes all of them at the same allocation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

import torch
import torch.nn.functional as F

METHODS = ("pqcache", "pqcache-offload", "pqflex-dense", "sdpa-static", "sdpa")
COMPILED = {"pqcache", "pqcache-offload", "pqflex-dense", "sdpa-static"}
PQ_METHODS = {"pqcache", "pqcache-offload", "pqflex-dense"}  # attention "pqcache"

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


def check_tp(preset: str, tp: int) -> None:
    """Raise ``ValueError`` unless ``tp`` ranks split the preset's attention and KV heads into whole heads."""
    cfg = model_config(preset)
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    allowed = [d for d in range(1, math.gcd(H, Hkv) + 1) if H % d == 0 and Hkv % d == 0]
    if tp not in allowed:
        raise ValueError(f"--tp {tp} does not divide the {H} attention and {Hkv} KV heads of {preset}; "
                         f"allowed: {allowed}")


def write_stub_checkpoint(preset: str, path: str) -> None:
    """A checkpoint directory of the preset's shape holding one small tensor (the final norm's weight):
    ``from_pretrained`` initializes every missing weight randomly, under TP each rank only its own shard."""
    from safetensors.torch import save_file

    cfg = model_config(preset)
    cfg.save_pretrained(path)
    save_file({"model.norm.weight": torch.ones(cfg.hidden_size)}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


def load_sharded(path: str, attn: str, dtype: torch.dtype):
    """The stub checkpoint at ``path`` loaded with ``tp_plan="auto"`` (this rank's shard, on its device)."""
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report lists every weight as missing: the stub's whole point
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings():
            # transformers >= 5.17 prefers distributed_config=DistributedConfig(...); tp_plan is what users write.
            warnings.filterwarnings("ignore", message=".*tp_plan.*", category=FutureWarning)
            model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", attn_implementation=attn, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()


@contextlib.contextmanager
def stub_checkpoint(preset: str) -> Iterator[str]:
    """Rank 0 writes the preset's stub checkpoint in a temporary directory, the other ranks get its path (one
    host: the ranks of ``torchrun --standalone``); removed when the block ends."""
    import torch.distributed as dist

    path = [tempfile.mkdtemp(prefix="pqflex-bench-") if dist.get_rank() == 0 else None]
    try:
        if dist.get_rank() == 0:
            write_stub_checkpoint(preset, path[0])
        dist.broadcast_object_list(path, src=0)
        yield path[0]
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(path[0], ignore_errors=True)


def launch(argv: list[str], tp: int) -> int:
    """Run ``pqflex <argv>`` on ``tp`` local processes with torch's launcher; its exit code.

    The launcher would give each rank one CPU thread (``OMP_NUM_THREADS=1``); the ranks get an equal share of the
    cores instead (CPU k-means, weight initialization), unless ``OMP_NUM_THREADS`` is set already.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp),
               "-m", "pqflex.harness.cli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(rank_threads(tp)))
    print(f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} " + " ".join(command), flush=True)
    return subprocess.run(command, env=env).returncode


def rank_threads(ranks: int) -> int:
    """CPU threads per rank when ``ranks`` processes share this machine's cores (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // ranks)


@contextlib.contextmanager
def process_group(device: str) -> Iterator[str]:
    """This rank's process group (nccl on CUDA, gloo on the CPU) for the block; yields this rank's device."""
    import torch.distributed as dist

    if device.startswith("cuda"):
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    try:
        yield device
    finally:
        # On two H200s a rank once hung after its last row (nccl, CUDA graphs): every rank drains its stream, and
        # the compiled graphs (which captured the communicator's kernels) go, before the group is destroyed.
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        torch._dynamo.reset()
        gc.collect()
        dist.destroy_process_group()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def prompt_ids(vocab: int, batch: int, context: int, device: str, seed: int) -> torch.Tensor:
    """Random token ids ``[batch, context]`` from a generator seeded with ``seed`` on ``device``."""
    return torch.randint(0, vocab, (batch, context), device=device,
                         generator=torch.Generator(device=device).manual_seed(seed))


def check_same_prompt(vocab: int, device: str) -> None:
    """Raise ``RuntimeError`` unless every rank draws the same prompt from the seeded generator (every rank must
    call it). Checked once before the sweep rather than broadcast in each run: a collective inside a run would pair
    with another rank's failure flag when one rank runs out of memory before it."""
    ids = prompt_ids(vocab, 1, 256, device, seed=0).tolist()
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, ids)
    if any(other != ids for other in every):
        raise RuntimeError("the ranks' seeded generators drew different prompts; TP needs the same prompt on each")


def any_rank(flag: bool, device: str) -> bool:
    """Whether ``flag`` holds on any rank (every rank must call it)."""
    if not _distributed():
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


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
    attn = "pqcache" if method in PQ_METHODS else "sdpa"
    model = model if model is not None else build_model(preset, attn, dtype, device)
    capacity = context + warmup + new_tokens + 1
    t0 = time.perf_counter()
    if attn == "pqcache":
        pq = pqflex.PQConfig(budget=1.0 if method == "pqflex-dense" else budget, **(options or {}))
        pqflex.configure(model, pq.replace(offload=False))  # the warm-up below uses a growing cache
        cache = pqflex.PQStaticCache(model, capacity, cache_config(method, pq), max_batch_size=batch)
    elif method == "sdpa-static":
        cache = StaticCache(config=model.config, max_cache_len=capacity)
    else:
        cache = DynamicCache(config=model.config)
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
        if profile:
            name = f"{preset}_{method}_b{batch}_n{context}_rank{_rank()}"
            token = profile_steps(lambda t: decode(t)[:, -1:].argmax(-1), token, tree, device,
                                  os.path.join(profile, name))
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None
    kv, hits = cache_stats(cache)
    return Result(preset, method, batch, context, shown_budget(method, budget), ttft, statistics.median(times) * 1e3,
                  None, peak, len(times), kv_gib=kv, hit_rate=hits, cache_setup_s=setup,
                  tp=getattr(model, "tp_size", None) or 1, prefill_chunk=prefill_chunk, compiled=compiled,
                  graphed=graphed)


def profile_steps(step, token: torch.Tensor, graphs: bool, device: str, path: str, steps: int = 3) -> torch.Tensor:
    """``steps`` decode steps (``token = step(token)``) under ``torch.profiler``: ``path.json`` (Chrome trace) and
    ``path.txt`` (ops by self host time). Returns the last token."""
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
    prof.export_chrome_trace(path + ".json")
    with open(path + ".txt", "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    return token


def shown_budget(method: str, budget: float | int) -> float | int:
    """The budget a row reports: 1.0 for the methods that attend to every token."""
    return 1.0 if method in ("pqflex-dense", "sdpa", "sdpa-static") else budget


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
    """A logits processor that synchronizes and stamps the time of every generated token (it changes nothing)."""

    def __init__(self, device: str) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def run_generate(model, method: str, batch: int, context: int, new_tokens: int, warmup: int,
                 device: str, prefill_chunk: int | None = None) -> tuple[float, float]:
    """TTFT (s) and TPOT (ms, median over the tokens after ``warmup``) of ``model.generate()`` as users call it.

    ``model`` is configured for the method already (:func:`run_method` did it). Greedy, ``min_new_tokens`` fixed.
    The offload method's cache takes the model's settings with ``offload=True``.
    """
    import pqflex
    from transformers import LogitsProcessorList

    capacity = context + warmup + new_tokens + 1
    kwargs: dict[str, Any] = {}
    if method in PQ_METHODS:
        kwargs[pqflex.CACHE_KWARG] = pqflex.PQStaticCache(model, capacity, cache_config(
            method, pqflex.get_config(model)), max_batch_size=batch)  # offload: CPU memory allocated here
    elif method == "sdpa-static":
        kwargs["cache_implementation"] = "static"
    if prefill_chunk:
        kwargs["prefill_chunk_size"] = prefill_chunk
    ids = prompt_ids(model.config.vocab_size, batch, context, device, seed=1)
    stamps = _Stamps(device)
    n = warmup + new_tokens
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, logits_processor=LogitsProcessorList([stamps]), **kwargs)
    steps = [b - a for a, b in zip(stamps.times, stamps.times[1:])][warmup:]
    return stamps.times[0] - t0, statistics.median(steps) * 1e3


def environment(device: str) -> dict[str, str]:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    if device.startswith("cuda"):
        env["card"] = torch.cuda.get_device_name()
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        env["card"] = f"CPU ({platform.processor() or platform.machine()})"
    return env


def table(results: list[Result]) -> str:
    head = ("| preset | method | tp | batch | context | budget | TTFT s | TPOT ms | generate TTFT s | generate TPOT ms "
            "| attn µs/layer | peak GiB | KV GiB on device | hot hits |")
    lines = [head, "|" + "---|" * 14]

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for r in results:
        oom = "OOM" if r.error == "out of memory" else r.error
        times = (f"{oom} | {oom} | " if r.error else f"{r.ttft_s:.3f} | {r.tpot_ms:.2f} | ")
        lines.append(f"| {r.preset} | {r.method} | {r.tp} | {r.batch} | {r.context} | {r.budget} | {times}"
                     f"{fmt(r.gen_ttft_s, '.3f')} | {fmt(r.gen_tpot_ms, '.2f')} | "
                     f"{fmt(r.attn_layer_us, '.1f')} | {fmt(r.peak_gib, '.1f')} | {fmt(r.kv_gib, '.2f')} | "
                     f"{fmt(r.hit_rate, '.1%')} |")
    return "\n".join(lines)


def notes(results: list[Result], device: str) -> str:
    """Why a column of the table holds ``-``."""
    lines = []
    if not device.startswith("cuda"):
        lines.append("attn µs/layer and peak GiB: measured on CUDA only (CUDA events, the allocator's peak)")
    elif any(r.attn_layer_us is None for r in results):
        lines.append("attn µs/layer: not timed for pqcache-offload and with --no-layer-attention")
    if any(r.gen_tpot_ms is None for r in results):
        lines.append("generate TTFT/TPOT: not measured with --no-generate")
    if any(r.kv_gib is None for r in results):
        lines.append("KV GiB on device: the static-cache methods only")
    if any(r.hit_rate is None for r in results):
        lines.append("hot hits: pqcache-offload rows only")
    return "\n".join(f"- {line}" for line in lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
    """PNG of TPOT vs context, one line per (method, batch)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from e
    fig, ax = plt.subplots(figsize=(6, 4))
    results = [r for r in results if not r.get("error")]
    for key in sorted({(r["method"], r["batch"]) for r in results}):
        pts = sorted((r["context"], r["tpot_ms"]) for r in results if (r["method"], r["batch"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} (batch {key[1]})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("TPOT (ms)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def device_and_dtype(args) -> tuple[str, torch.dtype]:
    """The ``--device`` (default: CUDA when there is one) and ``--dtype`` of a command."""
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu"), DTYPES[args.dtype]


def measure(args, method: str, batch: int, context: int, model, device: str, dtype: torch.dtype,
            options: dict[str, Any]) -> Result:
    """One row of the sweep: :func:`run_method`, then (unless switched off) :func:`run_generate` and
    :func:`layer_attention_us`."""
    chunk = args.prefill_chunk
    r = run_method(args.preset, method, batch, context, args.budget, args.new_tokens, args.warmup, dtype, device,
                   options, model=model, prefill_chunk=chunk, compile=not args.eager, profile=args.profile,
                   graphed=args.graphed)
    if not args.no_generate:
        r.gen_ttft_s, r.gen_tpot_ms = run_generate(model, method, batch, context, args.new_tokens, args.warmup,
                                                   device, prefill_chunk=chunk)
    if device.startswith("cuda") and not args.no_layer_attention and method != "pqcache-offload":
        r.attn_layer_us = layer_attention_us(args.preset, method, batch, context, args.budget, dtype, options, r.tp)
    return r


def free_memory(device: str) -> None:
    """Release what a finished or failed run left: objects in reference cycles, compiled graphs (and their CUDA
    graph pools), then cached blocks."""
    gc.collect()
    torch._dynamo.reset()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main(args) -> int:
    """Entry point of ``pqflex bench`` (arguments parsed in :mod:`pqflex.harness.cli`).

    With ``args.tp > 1`` and no launcher (``WORLD_SIZE`` unset) it relaunches itself on ``args.tp`` processes
    (``args.argv``: the command line) and returns their exit code; under a launcher each rank runs the sweep.
    """
    from pqflex import PQConfig

    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        results = [Result(**r) for r in data["results"]]
        print(table(results))
        print(" ".join(f"{k}={v}" for k, v in data["environment"].items()))
        if args.plot:
            plot(data["results"], args.plot)
        return 0
    device, dtype = device_and_dtype(args)
    tp = args.tp
    check_tp(args.preset, tp)  # bad presets and degrees raise before any work
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise ValueError(f"--prefill-chunk must be a positive number of tokens, got {args.prefill_chunk}")
    options = dict(args.pq, selection=args.selection, block_size=args.block_size)
    if args.backend is not None:
        options["backend"] = args.backend
    PQConfig(**{**options, "budget": args.budget})  # bad settings raise before any work
    world = os.environ.get("WORLD_SIZE")
    if tp > 1 and device == "cpu" and torch.cuda.is_available():
        raise ValueError(f"--tp {tp} runs on the GPUs (transformers' tp_plan='auto' takes the accelerator); "
                         "--device cpu with --tp needs a machine without CUDA (or CUDA_VISIBLE_DEVICES='')")
    if tp > 1 and world is None:
        return launch(args.argv, tp)
    if int(world or 1) != tp:
        raise ValueError(f"--tp {tp} but the launcher started WORLD_SIZE={world} processes; "
                         f"launch --nproc-per-node {tp} (or leave --tp out under a launcher of 1)")
    with contextlib.ExitStack() as stack:
        if tp == 1:
            load = functools.partial(build_model, args.preset, dtype=dtype, device=device)
        else:
            device = stack.enter_context(process_group(device))
            load = functools.partial(load_sharded, stack.enter_context(stub_checkpoint(args.preset)), dtype=dtype)
        sweep(args, device, dtype, options, load)
    return 0


def sweep(args, device: str, dtype: torch.dtype, options: dict[str, Any], load) -> list[Result]:
    """Every (batch, context, method) of the command; ``load(attn)`` builds or loads the model of an attention
    implementation. Rank 0 prints each row as it is measured and rewrites ``--json`` after each."""
    import pqflex
    from pqflex import PQConfig

    lead = _rank() == 0
    if _distributed():
        check_same_prompt(model_config(args.preset).vocab_size, device)
    results, models = [], {}
    if lead:
        print("\n".join(table([]).splitlines()[:2]), flush=True)  # the header once; each row as it is measured
    for batch in args.batch:
        for context in args.contexts:
            for method in args.methods:
                attn = "pqcache" if method in PQ_METHODS else "sdpa"
                if attn not in models:  # one model per attention implementation, reused across runs
                    models.clear()
                    # Under TP transformers wraps each sharded layer's forward in a closure over the layer: only
                    # the cycle collector frees those weights, and the next model must not load beside them.
                    free_memory(device)
                    models[attn] = load(attn)
                tp = getattr(models[attn], "tp_size", None) or 1
                if lead:  # a row can take minutes (compile, a long prefill): say what runs
                    print(f"measuring {method}, batch {batch}, context {context}...", file=sys.stderr, flush=True)
                try:
                    with pqflex.tp_inference(models[attn]):  # what the README tells TP users to decode under
                        r = measure(args, method, batch, context, models[attn], device, dtype, options)
                except torch.cuda.OutOfMemoryError as e:  # the message says which allocation failed
                    print(f"rank {_rank()}: {method} batch {batch} context {context}: {str(e).splitlines()[0]}",
                          file=sys.stderr, flush=True)
                    r = None
                if any_rank(r is None, device):  # every rank records the OOM, whichever ranks had it
                    r = Result(args.preset, method, batch, context, shown_budget(method, args.budget), math.nan,
                               math.nan, None, None, 0, tp=tp, error="out of memory")
                    free_memory(device)
                if tp > 1:
                    r.peak_gib_ranks = [None] * tp
                    torch.distributed.all_gather_object(r.peak_gib_ranks, r.peak_gib)
                results.append(r)
                if not lead:
                    continue
                print(table([r]).splitlines()[-1], flush=True)
                data = {"environment": environment(device), "dtype": args.dtype,
                        **dataclasses.asdict(PQConfig(**{**options, "budget": args.budget})),
                        "results": [dataclasses.asdict(r) for r in results]}
                if args.json:  # rewritten after every run, so a long sweep keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump(data, f, indent=1)
    if lead:
        print(notes(results, device))
        print(" ".join(f"{k}={v}" for k, v in environment(device).items()))
        if args.plot:
            plot([dataclasses.asdict(r) for r in results], args.plot)
    return results
