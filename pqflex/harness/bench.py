"""``pqflex bench``: decode speed of pqcache against dense attention on random-weight models of real shapes.

Speed does not depend on the weights, so each preset builds its model from a config (no download). Methods:

- ``pqcache``: attention ``"pqcache"`` with a :class:`pqflex.PQStaticCache`, decode step compiled;
- ``pqcache-offload``: the same with ``offload=True``: keys and values in CPU memory, the GPU holding the
  sink, the recent window, the hot-token cache and the PQ state (:class:`pqflex.OffloadedKV`);
- ``pqflex-dense``: the same machinery with ``budget=1.0``: every token through the fused decode kernel (the span
  ``[start, n)`` read like a recent window: dense flash-decoding);
- ``sdpa-static``: transformers' SDPA with its ``StaticCache``, decode step compiled;
- ``sdpa``: transformers' SDPA with its ``DynamicCache``, eager.

Compiled steps use ``torch.compile(fullgraph=True, dynamic=False)``, with CUDA graphs (``mode="reduce-overhead"``)
on CUDA; with ``--graphed`` they go through a :class:`pqflex.DecodeGraph` instead (the compiled step captured once
and replayed without Dynamo's per-step guard checks). Reported: TTFT (the prefill forward, index build included),
TPOT (median of the timed decode steps after the warm-up steps), the decode attention time of one layer at that
context (a CUDA-graphed micro-benchmark of the method's attention step; dense SDPA for the sdpa methods), peak GPU
memory, card and versions; and TTFT and TPOT as a user sees them, through ``model.generate()`` with a timestamp at every token (:func:`run_generate`:
generate compiles the static caches' decode step itself, with CUDA graphs on CUDA).

``--budget 0.1,2048``: a row of each pqcache method at each budget (the dense methods once). Every row carries its
byte floor (:func:`decode_step_bytes` at :func:`copy_bandwidth`, measured once at the start): no decode step can
read what it must faster.

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
import json
import math
import os
import sys
from typing import Any

import torch

from pqflex.harness.bench_launch import (any_rank, check_same_prompt, check_tp, launch, load_sharded,  # noqa: F401
                                         process_group, rank_threads, stub_checkpoint)
from pqflex.harness.bench_measure import (COMPILED, DENSE_METHODS, DTYPES, METHODS, PQ_METHODS,  # noqa: F401
                                          PRESETS, Result, attention_of, build_model, copy_bandwidth,
                                          decode_step_bytes, device_and_dtype, free_memory, graph_time_us,
                                          layer_attention_us, measure, model_config, run_generate, run_method,
                                          shown_budget, _distributed, _rank)
from pqflex.harness.bench_report import breakdown_table, environment, notes, plot, table  # noqa: F401


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
        if breakdown_table(results):
            print(breakdown_table(results))
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
    for budget in getattr(args, "budgets", [args.budget]):
        PQConfig(**{**options, "budget": budget})  # bad settings raise before any work
    if options.get("refresh") and not (args.graphed or args.eager):
        raise ValueError(f"--pq refresh={options['refresh']} refreshes the index between decode steps on the host: "
                         "add --graphed (steps through pqflex.DecodeGraph) or --eager; a step compiled by "
                         "torch.compile alone cannot")
    if "flashinfer" in args.methods:
        from pqflex.harness import bench_flashinfer

        why = bench_flashinfer.unavailable(device) or ("the flashinfer row runs on one GPU, not under --tp"
                                                       if tp > 1 else None)
        if why:
            raise ValueError(f"--methods flashinfer: {why}")
        bench_flashinfer.register()
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
    bandwidth = copy_bandwidth(device)  # the byte floor of every row is at this rate
    env = {**environment(device), "copy_GBps": f"{bandwidth / 1e9:.4g}"}  # 4 digits: the floors follow from it
    if lead:
        print("\n".join(table([]).splitlines()[:2]), flush=True)  # the header once; each row as it is measured
    budgets = getattr(args, "budgets", [args.budget])
    runs = [(method, budget) for method in args.methods  # a dense method's row does not depend on the budget
            for budget in (budgets[:1] if method in DENSE_METHODS else budgets)]
    for batch in args.batch:
        for context in args.contexts:
            for method, budget in runs:
                attn = attention_of(method)
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
                        r = measure(args, method, batch, context, models[attn], device, dtype, options, bandwidth,
                                    budget)
                except torch.cuda.OutOfMemoryError as e:  # the message says which allocation failed
                    print(f"rank {_rank()}: {method} batch {batch} context {context}: {str(e).splitlines()[0]}",
                          file=sys.stderr, flush=True)
                    r = None
                if any_rank(r is None, device):  # every rank records the OOM, whichever ranks had it
                    r = Result(args.preset, method, batch, context, shown_budget(method, budget), math.nan,
                               math.nan, None, None, 0, tp=tp, error="out of memory")
                    free_memory(device)
                if tp > 1:
                    r.peak_gib_ranks = [None] * tp
                    torch.distributed.all_gather_object(r.peak_gib_ranks, r.peak_gib)
                results.append(r)
                if not lead:
                    continue
                print(table([r]).splitlines()[-1], flush=True)
                data = {"environment": env, "dtype": args.dtype,
                        **dataclasses.asdict(PQConfig(**{**options, "budget": args.budget})),
                        "results": [dataclasses.asdict(r) for r in results]}
                if args.json:  # rewritten after every run, so a long sweep keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump(data, f, indent=1)
    if lead:
        print(notes(results, device))
        if breakdown_table(results):  # the profiled steps (profiler on, so slower than TPOT): where the GPU went
            print(breakdown_table(results))
        print(" ".join(f"{k}={v}" for k, v in env.items()))
        if args.plot:
            plot([dataclasses.asdict(r) for r in results], args.plot)
    return results

