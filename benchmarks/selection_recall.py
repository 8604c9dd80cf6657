"""Selection recall of PQ top-k against exact top-k, on the default model's real keys and queries (issue #12).

For each prompt (the suite's passkey and single-needle tasks at each length) the default model
(SmolLM2-135M-Instruct, fp32, CPU; 30 layers, Hkv=3, G=3, D=64) runs ONE dense prefill with transformers'
``DynamicCache``. Every layer's post-RoPE keys ``[1, Hkv, N, D]`` are read from the cache; the query of the last
prompt position ``[1, H, 1, D]`` of every layer is recorded by a registered attention function
(:data:`PROBE`): transformers calls it with the post-RoPE query it attends with, it keeps the last row and
returns transformers' own SDPA attention, so the prefill is the ``"sdpa"`` model's (mask included: the probe's
mask function is sdpa's). No model ``forward`` is patched and nothing is recomputed; the implementation is
switched with ``model.set_attn_implementation`` for the prefill and restored after it.

For each PQ setting ``(M, nbits)`` at the library's budget accounting (``PQConfig(M, nbits, budget)``: sink 32,
recent half of the rest, top-k the other half, resolved on the prompt length ``N``), the keys of all layers are
indexed (``PQIndex.build``: k-means on the middle keys of each layer and KV head, then codes) and the query of the
last position selects its middle tokens as a decode step at ``N - 1`` would (``PQIndex.select(query, N, scale)``).
The same config with ``scorer="exact"`` gives the oracle selection (top-k of the exact ``q . k``, same GQA rule).
Per layer and KV head:

- ``recall = |PQ set & exact set| / |exact set|``;
- ``mass = mass(PQ set) / mass(exact set)``, where a token's mass is its GQA-summed exact softmax over the middle
  tokens (:func:`pqflex.ops.portable.gqa_scores` of the exact scores): the share of the attention the oracle
  captures that PQ captures too. ``exact_share = mass(exact set) / G`` is that attention's share of the middle.

The layers of a prompt are indexed as one batch (``B`` = layers; k-means and top-k are per row, so this equals
indexing each layer alone), split into chunks that bound the k-means distance matrix. The CLI prints a line per
(length, setting) as it goes, then the mean over layers, KV heads and prompts per setting and length (and the
worst layer) as a markdown table; ``--json`` keeps every per-layer number. The defaults (``--niter 10``, 2 prompts at
2K and 4K, 1 at 8100) keep the full run near 13 minutes on a 2-core CPU; at 2K, ``--niter 20`` (the library's
default) moved no mean by more than 0.005. Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/selection_recall.py [--lengths 2048,4096,8100] [--prompts 2,2,1]
        [--settings 2x6,8x8] [--niter 20] [--budget 0.1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from pqflex import CACHE_KWARG, PQConfig, PQIndex
from pqflex.harness.models import load_default_model
from pqflex.harness.suite import make_sample
from pqflex.ops import portable

FRONTIER = [(M, nbits) for M in (2, 4, 8, 16) for nbits in (4, 6, 8)]
PROBE = "pqflex_selection_recall_probe"
# Bytes of the largest k-means distance matrix [layers * Hkv * M, points, ksub] (fp32) of one index build.
CHUNK_BYTES = 512 << 20

_queries: dict[int, torch.Tensor] = {}  # layer index -> [B, H, 1, D] query of the last position (probe only)


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function: record the last query row of the layer, then attend with SDPA."""
    _queries[module.layer_idx] = query[:, :, -1:].detach().clone()  # [B, H, 1, D]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(PROBE, _probe_attention)
AttentionMaskInterface.register(PROBE, sdpa_mask)


def prefill(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One dense prefill; returns every layer's cached keys ``[L, Hkv, N, D]`` and last queries ``[L, H, 1, D]``."""
    before = model.config._attn_implementation
    cache = DynamicCache(config=model.config)
    _queries.clear()
    model.set_attn_implementation(PROBE)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
    finally:
        model.set_attn_implementation(before)
    L = model.config.num_hidden_layers
    if sorted(_queries) != list(range(L)) or len(cache.layers) != L:
        raise RuntimeError(f"expected {L} layers, recorded queries of {sorted(_queries)} and {len(cache.layers)} "
                           "cache layers")
    keys = torch.cat([cache.layers[i].keys for i in range(L)])  # [L, Hkv, N, D]
    queries = torch.cat([_queries[i] for i in range(L)])  # [L, H, 1, D]
    _queries.clear()
    return keys.float(), queries.float()


def layer_chunk(config: PQConfig, Hkv: int, N: int) -> int:
    """Layers per index build so that the k-means distance matrix stays under :data:`CHUNK_BYTES`."""
    points = N if config.train_points == 0 else min(N, config.train_points * config.ksub)
    return max(1, CHUNK_BYTES // (Hkv * config.M * points * config.ksub * 4))


def selection_scores(keys: torch.Tensor, queries: torch.Tensor, config: PQConfig) -> dict[str, torch.Tensor]:
    """Recall and mass ratio ``[L, Hkv]`` of the PQ selection of ``config`` against the exact one.

    Args:
        keys: ``[L, Hkv, N, D]`` post-RoPE keys of the ``L`` layers (one prompt).
        queries: ``[L, H, 1, D]`` the last position's query of each layer.
        config: the PQ setting; its ``scorer="exact"`` twin gives the reference selection.
    """
    L, Hkv, N, D = keys.shape
    H = queries.shape[1]
    G = H // Hkv
    scale = D ** -0.5
    pq_sel, exact_sel, probs = [], [], []
    step = layer_chunk(config, Hkv, N)
    for s in range(0, L, step):
        k, q = keys[s:s + step], queries[s:s + step]
        pq_sel.append(PQIndex.build(k, config).select(q, N, scale))  # [l, Hkv, k_max]
        exact = PQIndex.build(k, config.replace(scorer="exact"))
        exact_sel.append(exact.select(q, N, scale, k))  # [l, Hkv, k_max]
        lo, hi = exact.start + exact.sink, N - exact.recent  # [l]: the middle tokens [lo, hi)
        pos = torch.arange(N)
        candidates = ((pos >= lo[:, None]) & (pos < hi[:, None]))[:, None, :]  # [l, 1, N]
        g = q.reshape(q.shape[0], Hkv, G, D)  # [l, Hkv, G, D]
        scores = exact.scores(g, scale, k)  # [l, Hkv, G, N]
        probs.append(portable.gqa_scores(scores[:, :, :, None], candidates)[:, :, 0].clamp(min=0))  # [l, Hkv, N]
    pq_sel, exact_sel, probs = torch.cat(pq_sel), torch.cat(exact_sel), torch.cat(probs)

    def member(sel: torch.Tensor) -> torch.Tensor:  # [L, Hkv, N] bool, True for the selected tokens
        out = torch.zeros(L, Hkv, N + 1, dtype=torch.bool)
        return out.scatter_(-1, torch.where(sel >= 0, sel.long(), N), True)[..., :N]

    in_pq, in_exact = member(pq_sel), member(exact_sel)
    n_exact = in_exact.sum(-1)  # [L, Hkv]
    if bool((n_exact == 0).any()) or not torch.equal(in_pq.sum(-1), n_exact):
        raise RuntimeError(f"selections differ in size: PQ {in_pq.sum(-1).tolist()}, exact {n_exact.tolist()}")
    mass_pq, mass_exact = (probs * in_pq).sum(-1), (probs * in_exact).sum(-1)  # [L, Hkv]
    # The oracle maximizes the mass of a GQA sum of softmaxes; PQ can only match it (ties) or fall below.
    assert bool((mass_pq <= mass_exact * (1 + 1e-4) + 1e-6).all()), "PQ selection outweighs the oracle"
    return {"recall": (in_pq & in_exact).sum(-1) / n_exact, "mass": mass_pq / mass_exact,
            "exact_share": mass_exact / G}


def parse_settings(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, text.split(",")):
        try:
            M, nbits = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--settings item {item!r} is not MxNBITS (e.g. 8x8)") from None
        out.append((M, nbits))
    return out


def parse_ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated ints, got {text!r}") from None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarize(per_prompt: list[dict[str, list]]) -> dict:
    """Means over layers, KV heads and prompts, and the layer with the lowest mean recall."""
    recall = torch.tensor([p["recall"] for p in per_prompt])  # [P, L, Hkv]
    mass = torch.tensor([p["mass"] for p in per_prompt])
    share = torch.tensor([p["exact_share"] for p in per_prompt])
    layer_recall, layer_mass = recall.mean((0, 2)), mass.mean((0, 2))  # [L]
    worst = int(layer_recall.argmin())
    return {"recall": recall.mean().item(), "mass": mass.mean().item(), "exact_share": share.mean().item(),
            "recall_min": recall.min().item(), "mass_min": mass.min().item(),
            "worst_layer": worst, "worst_layer_recall": layer_recall[worst].item(),
            "worst_layer_mass": layer_mass[worst].item(),
            "layer_recall": layer_recall.tolist(), "layer_mass": layer_mass.tolist()}


def markdown(results: dict, settings: list[tuple[int, int]], lengths: list[int]) -> str:
    head = "| M | nbits | bits/token/head | " + " | ".join(f"{n}: recall / mass" for n in lengths) + \
           " | worst layer (recall / mass) |"
    rows = [head, "|---:|---:|---:|" + "---:|" * len(lengths) + "---|"]
    for M, nbits in settings:
        cells, worst = [], []
        for n in lengths:
            s = results.get(f"{M}x{nbits}", {}).get(str(n), {}).get("summary")
            cells.append("-" if s is None else f"{s['recall']:.3f} / {s['mass']:.3f}")
            if s is not None:
                worst.append(f"{n}: L{s['worst_layer']} {s['worst_layer_recall']:.2f} / {s['worst_layer_mass']:.2f}")
        rows.append(f"| {M} | {nbits} | {M * nbits} | " + " | ".join(cells) + " | " + "; ".join(worst) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096,8100", help="prompt lengths in tokens")
    parser.add_argument("--prompts", default="2,2,1",
                        help="prompts per length: one int for all, or one per length (tasks alternate)")
    parser.add_argument("--tasks", default="passkey,niah_single", help="suite tasks the prompts cycle through")
    parser.add_argument("--settings", default=",".join(f"{M}x{b}" for M, b in FRONTIER),
                        help="PQ settings MxNBITS, comma-separated (default: M in 2,4,8,16 x nbits in 4,6,8)")
    parser.add_argument("--budget", type=float, default=0.1, help="PQConfig.budget (fraction of the prompt)")
    parser.add_argument("--niter", type=int, default=10, help="k-means iterations (PQConfig.niter)")
    parser.add_argument("--train-points", type=int, default=64,
                        help="k-means trains on at most this many keys per centroid (PQConfig.train_points)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write every per-layer number here")
    args = parser.parse_args(argv)

    lengths = parse_ints(args.lengths, "--lengths")
    prompts = parse_ints(args.prompts, "--prompts")
    if len(prompts) == 1:
        prompts = prompts * len(lengths)
    if len(prompts) != len(lengths) or min(prompts) < 1:
        raise ValueError(f"--prompts needs one int >= 1 or one per length ({len(lengths)}), got {args.prompts!r}")
    tasks = [t for t in args.tasks.split(",") if t]
    settings = parse_settings(args.settings)
    configs = {f"{M}x{b}": PQConfig(M=M, nbits=b, budget=args.budget, niter=args.niter,
                                         train_points=args.train_points) for M, b in settings}
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    model, tokenizer = load_default_model("sdpa")
    D = model.config.head_dim if getattr(model.config, "head_dim", None) else \
        model.config.hidden_size // model.config.num_attention_heads
    for name, cfg in configs.items():
        if D % cfg.M:
            raise ValueError(f"setting {name}: M={cfg.M} does not divide the head dim {D}")

    results: dict[str, dict[str, dict]] = {name: {} for name in configs}
    samples_info: dict[str, list] = {}
    for n, n_prompts in zip(lengths, prompts):
        samples_info[str(n)] = []
        for name in configs:
            results[name][str(n)] = {"prompts": [], "seconds": 0.0}
        for i in range(n_prompts):
            task, seed = tasks[i % len(tasks)], i // len(tasks)
            sample = make_sample(tokenizer, task, n, seed)
            t0 = time.perf_counter()
            keys, queries = prefill(model, torch.tensor([sample.input_ids]))
            t_prefill = time.perf_counter() - t0
            N = keys.shape[2]
            budget = next(iter(configs.values())).resolve_budget(N)
            samples_info[str(n)].append({"task": task, "seed": seed, "n_tokens": N, "prefill_s": t_prefill,
                                         "budget": budget._asdict()})
            print(f"[{n}] prompt {i}: {task} seed {seed}, N={N}, sink/recent/topk={budget.sink_size}/"
                  f"{budget.recent_size}/{budget.topk}, prefill {t_prefill:.1f}s", file=sys.stderr, flush=True)
            for name, cfg in configs.items():
                t0 = time.perf_counter()
                out = selection_scores(keys, queries, cfg)
                dt = time.perf_counter() - t0
                entry = results[name][str(n)]
                entry["seconds"] += dt
                entry["prompts"].append({"task": task, "seed": seed, "n_tokens": N,
                                         **{k: v.tolist() for k, v in out.items()}})
                print(f"[{n}] prompt {i} {name}: recall {out['recall'].mean():.3f}, mass {out['mass'].mean():.3f}"
                      f" ({dt:.1f}s)", file=sys.stderr, flush=True)
            del keys, queries
        for name in configs:
            results[name][str(n)]["summary"] = summarize(results[name][str(n)]["prompts"])
    wall = time.perf_counter() - t_start

    table = markdown(results, settings, lengths)
    if args.json:
        record = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "model": "SmolLM2-135M-Instruct (embedded GGUF, fp32, CPU)",
            "torch": torch.__version__, "transformers": transformers.__version__, "cpu": cpu_name(),
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "budget": args.budget, "niter": args.niter, "train_points": args.train_points, "tasks": tasks, "lengths": lengths, "prompts": prompts,
            "config": {k: v for k, v in next(iter(configs.values())).__dict__.items() if k not in ("M", "nbits")},
            "samples": samples_info, "wall_s": wall, "results": results, "table": table,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwall time {wall:.0f}s; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{cpu_name()} ({torch.get_num_threads()} threads); budget {args.budget}, niter {args.niter}, "
          f"train_points {args.train_points}")
    print(table)


if __name__ == "__main__":
    main()
