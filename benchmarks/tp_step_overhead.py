"""Host time of a compiled decode step with and without tensor parallelism, on the CPU (issue #15).

On two H200s the compiled pqcache step was slower over 2 ranks than on one GPU (BENCHMARKS.md "Tensor
parallelism"). This probe looks at the host side: a 32-layer Llama of tiny width (so the arithmetic is negligible
and the step is mostly Python and dispatch), a compiled static-cache decode step (``fullgraph=True``), timed in one
process and over 2 gloo ranks loaded with ``tp_plan="auto"``. Under ``cProfile`` the step's time is split into the
collectives (gloo's all-reduces, slow on a CPU and absent from the GPU's question) and the rest; the rest is what
transformers' sharded (DTensor) parameters add on the host per step. ``--tp-inference`` compiles and times the step
inside ``pqflex.tp_inference(model)`` (each sharded ``Linear`` weight held as its local shard), to see how much of
that host time the DTensor weights cost.
``--filter-closure-guards`` compiles with a ``guard_filter_fn`` that drops the guards reached through a function's
closure (transformers installs each sharded layer's ``forward`` as a closure over the layer; an experiment).
``--skip-guards`` times the steps under ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` (an experiment:
Dynamo then runs the compiled graph without checking its guards), to see how much of it is guard evaluation.
Usage::

    PYTHONPATH=. python benchmarks/tp_step_overhead.py [--layers 32] [--steps 20] [--tp-inference] [--filter-closure-guards]
        [--skip-guards]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import subprocess
import sys
import tempfile
import time

import torch


def write_checkpoint(path: str, layers: int) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=4096).save_pretrained(path)
    save_file({"model.norm.weight": torch.ones(128)}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})  # every other weight is initialized randomly at load


def _no_closure_guards(entries) -> list[bool]:
    """Keep every guard but those reached through a closure cell (``guard_filter_fn``)."""
    return [".__closure__" not in entry.name for entry in entries]


def step_profile(path: str, steps: int, localize: bool, skip_guards: bool = False,
                 filter_closures: bool = False) -> None:
    """Load (sharded when under a launcher), compile the decode step, print rank 0's split."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, StaticCache
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tp = "WORLD_SIZE" in os.environ
    if tp:
        dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32,
                                                 **({"tp_plan": "auto"} if tp else {})).eval()
    import pqflex

    with pqflex.tp_inference(model) if localize else contextlib.nullcontext():  # tp_inference passes 1 process through
        cache = StaticCache(config=model.config, max_cache_len=400)
        ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            token = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            options = {"guard_filter_fn": _no_closure_guards} if filter_closures else None
            forward = torch.compile(model.forward, fullgraph=True, dynamic=False, options=options)
            for _ in range(3):
                token = forward(token, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            profile = cProfile.Profile()
            stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip_guards)
            with stance:
                t0 = time.perf_counter()
                profile.enable()
                for _ in range(steps):
                    token = forward(token, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
                profile.disable()
                step = (time.perf_counter() - t0) / steps * 1e3
    if not tp or dist.get_rank() == 0:
        stats = pstats.Stats(profile).stats
        collective = sum(v[2] for k, v in stats.items()  # tottime of the collectives' dispatch
                         if "c10d" in str(k) or k[2] == "redispatch") / steps * 1e3
        extra = ((", tp_inference" if localize else "") + (", closure guards filtered" if filter_closures else "")
                 + (", guards skipped" if skip_guards else ""))
        name = f"{dist.get_world_size()} ranks (tp_plan='auto'{extra})" if tp else f"1 process{extra}"
        print(f"| {name} | {step:.2f} | {collective:.2f} | {step - collective:.2f} |", flush=True)
    if tp:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tp-inference", action="store_true", help="compile and time inside pqflex.tp_inference()")
    parser.add_argument("--filter-closure-guards", action="store_true",
                        help="compile without the guards reached through closures (experiment)")
    parser.add_argument("--skip-guards", action="store_true",
                        help="time under set_stance(skip_guard_eval_unsafe=True) (experiment)")
    parser.add_argument("--profile-checkpoint", default=None, help=argparse.SUPPRESS)  # a checkpoint path: profile it here
    args = parser.parse_args()
    if args.profile_checkpoint:
        step_profile(args.profile_checkpoint, args.steps, args.tp_inference, args.skip_guards,
                     args.filter_closure_guards)
        return
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.layers} layers, CPU")
    print("| run | step ms | in collectives ms | rest ms |\n|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as path:
        write_checkpoint(path, args.layers)
        me = [sys.executable, os.path.abspath(__file__), "--profile-checkpoint", path, "--steps", str(args.steps),
              *(["--tp-inference"] if args.tp_inference else []), *(["--skip-guards"] if args.skip_guards else []),
              *(["--filter-closure-guards"] if args.filter_closure_guards else [])]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun gives each rank: the same for both runs
        subprocess.run(me, check=True, env=env)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(args.ranks), *me[1:]], check=True, env=env)


if __name__ == "__main__":
    main()
