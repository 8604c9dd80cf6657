"""Where the time of a compiled decode step goes, on one GPU and over tensor-parallel ranks (issue #15).

On two GPUs the compiled pqcache decode step of the Llama-3.1-8B shape took 1.5x the time of one GPU
(BENCHMARKS.md "Tensor parallelism"). This probe splits a step, per rank, into:

- host: from the call until the compiled step (and the next token's argmax) is launched and control returns:
  Dynamo's guards, the CUDA-graph tree's input checks, the replay launch;
- total: until the GPU has finished (the loop synchronizes after each step, as ``generate()`` does);

first as compiled (``mode="reduce-overhead"``), then with Dynamo's guard evaluation skipped
(``set_stance(skip_guard_eval_unsafe=True)``, an experiment); with ``--tp-inference`` all of it inside
``pqflex.tp_inference(model)`` (each sharded ``Linear`` weight as its local shard). Two steps run under
``torch.profiler`` (Chrome trace per rank under ``--out``) and the kernel launches outside CUDA graphs are counted:
if Inductor skipped CUDA graphs for the step, every kernel is launched from Python. ``TORCH_LOGS=cudagraphs`` prints
why it would.

Usage (a GPU; ``--tp 2`` relaunches itself under torch's launcher)::

    PYTHONPATH=. python benchmarks/tp_decode_probe.py --preset llama-3.1-8b --context 32768 [--tp 2] \
        [--methods pqcache,sdpa-static] [--tp-inference] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(forward, token, cache_kw: dict, steps: int) -> tuple[torch.Tensor, float, float]:
    """``steps`` decode steps; the medians of host time and total time per step, in ms."""
    host, total = [], []
    for _ in range(steps):
        torch.compiler.cudagraph_mark_step_begin()
        sync()
        t0 = time.perf_counter()
        token = forward(token, **cache_kw, logits_to_keep=1).logits[:, -1:].argmax(-1)
        t1 = time.perf_counter()
        sync()
        host.append(t1 - t0)
        total.append(time.perf_counter() - t0)
    return token, statistics.median(host) * 1e3, statistics.median(total) * 1e3


def profiled(forward, token, cache_kw: dict, path: str) -> tuple[torch.Tensor, dict]:
    """Two steps under the profiler: a Chrome trace at ``path`` and counts of launches and GPU time per step."""
    from torch.profiler import ProfilerActivity, profile

    gpu = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    with profile(activities=[ProfilerActivity.CPU, *gpu]) as prof:
        for _ in range(2):
            torch.compiler.cudagraph_mark_step_begin()
            token = forward(token, **cache_kw, logits_to_keep=1).logits[:, -1:].argmax(-1)
            sync()
    prof.export_chrome_trace(path)
    counts, kernel_us, nccl_us = {}, 0.0, 0.0
    for e in prof.events():
        if e.name in ("cudaLaunchKernel", "cudaGraphLaunch", "cuLaunchKernel", "cuLaunchKernelEx",
                      "cudaLaunchKernelExC"):
            counts[e.name] = counts.get(e.name, 0) + 1
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernel_us += e.device_time
            if "nccl" in e.name.lower():
                nccl_us += e.device_time
    return token, {"launches_per_step": {k: v / 2 for k, v in counts.items()},
                   "kernel_ms_per_step": kernel_us / 2e3, "nccl_ms_per_step": nccl_us / 2e3}


def probe(args) -> None:
    import pqflex
    from pqflex.harness import bench
    from transformers import StaticCache

    tp = int(os.environ.get("WORLD_SIZE", 1))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a smoke test of the probe itself
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    mode = "reduce-overhead" if device == "cuda" else None
    with contextlib.ExitStack() as stack:
        if tp > 1:
            device = stack.enter_context(bench.process_group(device))
            path = stack.enter_context(bench.stub_checkpoint(args.preset))
        rank = bench._rank()
        out = {}
        for method in args.methods.split(","):
            attn = "pqcache" if method == "pqcache" else "sdpa"
            torch._dynamo.reset()
            t = time.perf_counter()
            if tp > 1:
                model = bench.load_sharded(path, attn, dtype)
            else:
                model = bench.build_model(args.preset, attn, dtype, device)
            load_s = time.perf_counter() - t
            print(f"rank {rank} {method}: loaded in {load_s:.1f} s", flush=True)
            capacity = args.context + 64
            if attn == "pqcache":
                config = pqflex.PQConfig(budget=0.1)
                pqflex.configure(model, config)
                cache = pqflex.PQStaticCache(model, capacity, config, max_batch_size=1)
            else:
                cache = StaticCache(config=model.config, max_cache_len=capacity)
            kw = {pqflex.CACHE_KWARG: cache}
            ids = bench.prompt_ids(model.config.vocab_size, 1, args.context, device, seed=0)
            local = pqflex.tp_inference(model) if args.tp_inference else contextlib.nullcontext()
            with torch.no_grad(), local:
                t = time.perf_counter()
                for start in range(0, args.context, 8192):
                    logits = model(ids[:, start:start + 8192], **kw, logits_to_keep=1).logits
                token = logits[:, -1:].argmax(-1)
                sync()
                prefill_s = time.perf_counter() - t
                print(f"rank {rank} {method}: prefilled {args.context} tokens in {prefill_s:.1f} s", flush=True)
                forward = torch.compile(model.forward, fullgraph=True, dynamic=False, mode=mode)
                t = time.perf_counter()
                token, _, _ = timed_steps(forward, token, kw, 3)
                compile_s = time.perf_counter() - t
                print(f"rank {rank} {method}: compiled in {compile_s:.1f} s", flush=True)
                if rank == 0:  # where the compile time went (Dynamo tracing, AOT, Inductor codegen and compile)
                    from torch._dynamo.utils import compile_times

                    phases = ("bytecode_tracing", "create_aot_dispatcher_function", "fx_codegen_and_compile",
                              "async_compile.wait", "compile_file")
                    print("\n".join(line for line in compile_times(repr="str", aggregate=True).splitlines()
                                    if line.split(" ")[0] in phases), flush=True)
                row = {"tp": tp, "load_s": load_s, "prefill_s": prefill_s, "compile_s": compile_s}
                token, row["host_ms"], row["step_ms"] = timed_steps(forward, token, kw, args.steps)
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    token, row["noguard_host_ms"], row["noguard_step_ms"] = timed_steps(forward, token, kw, args.steps)
                trace = os.path.join(args.out, f"trace_{method}_tp{tp}_rank{rank}.json")
                token, prof = profiled(forward, token, kw, trace)
                row.update(prof)
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if device != "cpu" else None
            out[method] = row
            print(f"rank {rank} {method}: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                                          for k, v in row.items()}), flush=True)
            del model, cache, forward
            bench.free_memory(device)
        with open(os.path.join(args.out, f"probe_tp{tp}_rank{rank}.json"), "w") as f:
            json.dump(out, f, indent=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--methods", default="pqcache", help="comma-separated: pqcache, sdpa-static")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tp-inference", action="store_true", help="decode inside pqflex.tp_inference(model)")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.tp > 1 and "WORLD_SIZE" not in os.environ:
        threads = os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // args.tp)))
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(args.tp), os.path.abspath(__file__), *sys.argv[1:]], env=env).returncode
    probe(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
