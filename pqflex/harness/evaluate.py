"""``pqflex eval``: the offline long-context suite (:mod:`pqflex.harness.suite`), every method side by side.

Methods (:meth:`pqflex.PQConfig.for_method`): ``full`` attention, ``pqcache``, ``streaming`` (sink + recent only)
and ``oracle`` (exact top-k), all under one budget accounting: sink + recent + selected = budget tokens per KV
head. Each batch of prompts is prefilled once with dense attention; every method then decodes greedily from a
copy of that prefill (the sparse methods index it first), so the methods see identical prompts and prefill
states and differ only in the tokens each decode step attends. Results: one row per (sample, method, budget),
a markdown table of task scores (mean string-match accuracy, percent) and their average, JSON, and a plot.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from pqflex import CACHE_KWARG, METHODS, PQCache, PQConfig, configure
from pqflex.harness.suite import TASKS, Sample, make_sample, score, vocabulary


@dataclasses.dataclass
class Row:
    """The outcome of one sample under one method and budget (``budget`` is None for full attention)."""

    task: str
    length: int
    n_tokens: int
    seed: int
    method: str
    budget: float | int | None
    score: float
    prediction: str
    answers: list[str]


def _left_pad(samples: list[Sample], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(s.n_tokens for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, width - s.n_tokens:] = torch.tensor(s.input_ids)
        mask[i, width - s.n_tokens:] = 1
    return ids.to(device), mask.to(device)


def _copy_cache(model, dense: DynamicCache, config: PQConfig | None, kv_mask: torch.Tensor | None):
    """A cache holding a copy of the dense prefill: dense for ``config=None``, else a PQCache with its index."""
    if config is None:
        cache = DynamicCache(config=model.config)
        for i, layer in enumerate(dense.layers):
            cache.update(layer.keys.clone(), layer.values.clone(), i)
        return cache
    return PQCache.from_prefill(model, dense, config, kv_mask)


def _greedy(model, first: torch.Tensor, cache, mask: torch.Tensor, max_new_tokens: int,
            stop_ids: set[int]) -> list[list[int]]:
    """Batched greedy decoding from the prefill's last-position logits ``first [B, V]``."""
    B = first.shape[0]
    tokens = first.argmax(-1)  # [B]
    out, done = [[] for _ in range(B)], [False] * B
    pos = mask.sum(-1) - 1  # [B] position of each sequence's last prompt token
    for step in range(max_new_tokens):
        for b, t in enumerate(tokens.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in stop_ids
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = pos + 1
        logits = model(tokens[:, None], attention_mask=mask, position_ids=pos[:, None], use_cache=True,
                       **{CACHE_KWARG: cache}).logits[:, -1]
        tokens = logits.argmax(-1)
    return out


def method_runs(methods: list[str], budgets: list[float | int]) -> list[tuple[str, float | int | None]]:
    """The (method, budget) runs of each sample: full attention once, every other method at every budget."""
    return ([("full", None)] if "full" in methods else []) + [(m, b) for b in budgets for m in methods
                                                               if m != "full"]


def run_batch(model, tokenizer, samples: list[Sample], methods: list[str], budgets: list[float | int],
              settings: dict[str, Any] | None = None, stop_ids: set[int] = frozenset(),
              scorer: Callable[[str, Sample], float] | None = None) -> list[Row]:
    """Every method and budget on one batch of samples (one shared dense prefill).

    ``stop_ids``: tokens that end a sequence besides eos and pad; ``scorer(prediction, sample)``: the score of a
    prediction (default: :func:`pqflex.harness.suite.score`).
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None} | set(stop_ids)
    ids, mask = _left_pad(samples, pad, device)
    kv_mask = mask.bool() if not bool(mask.all()) else None
    model.set_attn_implementation("sdpa")
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        first = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                      **{CACHE_KWARG: dense}, logits_to_keep=1).logits[:, -1]
    new = max(s.max_new_tokens for s in samples)
    rows = []
    for method, budget in method_runs(methods, budgets):
        config = None if method == "full" else PQConfig.for_method(method, budget=budget, **(settings or {}))
        if config is None:
            model.set_attn_implementation("sdpa")
        else:
            configure(model, config)
        with torch.no_grad():
            cache = _copy_cache(model, dense, config, kv_mask)
            outputs = _greedy(model, first, cache, mask, new, stop)
        for s, toks in zip(samples, outputs):
            text = tokenizer.decode(toks[:s.max_new_tokens], skip_special_tokens=True)
            value = scorer(text, s) if scorer is not None else score(text, s.answers)
            rows.append(Row(s.task, 0, s.n_tokens, s.seed, method, budget, value, text, list(s.answers)))
        del cache
    model.set_attn_implementation("sdpa")
    return rows


def evaluate(model, tokenizer, tasks: list[str], lengths: list[int], budgets: list[float | int],
             methods: list[str], samples: int, seed: int = 0, batch_size: int = 1,
             settings: dict[str, Any] | None = None, log: Callable[[str], None] = print,
             done: set[tuple[int, str]] | None = None,
             on_batch: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """The suite: ``samples`` prompts per task and length (seeds ``seed .. seed + samples - 1``), every method.

    ``done``: (length, task) cells to skip (already measured); ``on_batch(rows)`` is called with the rows so far
    after every batch (to save partial results).
    """
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; allowed: {TASKS}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; allowed: {METHODS}")
    if "budget" in (settings or {}):
        raise ValueError("give budgets with the budgets argument (--budgets), not in the PQ settings")
    if any(m != "full" for m in methods):
        for b in budgets:
            for m in methods:
                if m != "full":  # bad budgets or settings raise before any work
                    PQConfig.for_method(m, budget=b, **(settings or {}))
    words = vocabulary(tokenizer)
    rows = []
    cells = [(length, task) for length in lengths for task in tasks if (length, task) not in (done or set())]
    total, finished, began = len(cells) * samples, 0, time.perf_counter()
    for length, task in cells:
        batch_samples = [make_sample(tokenizer, task, length, seed + i, words) for i in range(samples)]
        for start in range(0, samples, batch_size):
            t0 = time.perf_counter()
            batch = run_batch(model, tokenizer, batch_samples[start:start + batch_size], methods, budgets, settings)
            for r in batch:
                r.length = length
            rows += batch
            if on_batch is not None:
                on_batch(rows)
            n = len(batch_samples[start:start + batch_size])
            finished += n
            elapsed = time.perf_counter() - began
            eta = elapsed / finished * (total - finished)
            log(f"[{finished}/{total} prompts, {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min] {task} {length} "
                f"samples {start}-{start + n - 1}: {time.perf_counter() - t0:.1f} s")
    return rows


def _label(method: str, budget) -> str:
    return "full" if budget is None else f"{method} {budget}"


def summarize(rows: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, float]]:
    """Mean score (percent) per (length, method label) and task, plus ``"avg"`` over tasks."""
    acc: dict[tuple[int, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        acc[(r["length"], _label(r["method"], r["budget"]))][r["task"]].append(r["score"])
    out = {}
    for key, per_task in acc.items():
        means = {t: 100 * sum(v) / len(v) for t, v in per_task.items()}
        means["avg"] = sum(means.values()) / len(means)
        out[key] = means
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per length and method/budget, one column per task, the average last."""
    summary = summarize(rows)
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    counts = defaultdict(int)
    for r in rows:
        counts[(r["length"], _label(r["method"], r["budget"]), r["task"])] += 1
    lines = ["| length | method | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 3) + "|"]
    order = {m: i for i, m in enumerate(METHODS)}

    def key(item):
        (length, label), _ = item
        method, _, budget = label.partition(" ")
        return length, -float(budget) if budget else -float("inf"), order.get(method, len(order)), method

    for (length, label), means in sorted(summary.items(), key=key):
        lines.append(f"| {length} | {label} | " + " | ".join(f"{means[t]:.1f}" if t in means else "-" for t in tasks)
                     + f" | {means['avg']:.1f} |")
    n = sorted(set(counts.values()))
    lines.append(f"\nsamples per cell: {n[0] if len(n) == 1 else n}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """PNG: average score vs budget, one panel per length, one line per method (full attention dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    lengths = sorted({length for length, _ in summary})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), sharey=True, squeeze=False)
    found = {label.split(" ")[0] for _, label in summary}
    methods = [m for m in METHODS if m in found] + sorted(found - set(METHODS))  # e.g. relabelled variants
    for ax, length in zip(axes[0], lengths):
        for method in methods:
            if method == "full":
                if (length, "full") in summary:
                    ax.axhline(summary[(length, "full")]["avg"], color="black", ls="--", label="full attention")
                continue
            points = sorted((float(label.split(" ")[1]), means["avg"]) for (n, label), means in summary.items()
                            if n == length and label.split(" ")[0] == method)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_title(f"{length} tokens")
        ax.set_xlabel("budget (fraction of the context)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("suite average (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args) -> int:
    """Entry point of ``pqflex eval`` (arguments parsed in :mod:`pqflex.harness.cli`)."""
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
    else:
        from pqflex.harness.bench import device_and_dtype, environment
        from pqflex.harness.models import load_default_model, load_model

        device, dtype = device_and_dtype(args)
        if args.model:
            model, tokenizer = load_model(args.model, "sdpa", device=device, dtype=dtype)
        else:
            model, tokenizer = load_default_model("sdpa", device=device, dtype=dtype, progress=False)
        earlier, done = [], set()
        if args.resume:  # keep the complete (length, task) cells of an earlier, interrupted run
            with open(args.json) as f:
                earlier = json.load(f)["rows"]
            cells = defaultdict(int)
            for r in earlier:
                cells[(r["length"], r["task"])] += 1
            done = {cell for cell, n in cells.items() if n == len(method_runs(args.methods, args.budgets)) * args.samples}
            earlier = [r for r in earlier if (r["length"], r["task"]) in done]
        t0 = time.perf_counter()
        data = {"environment": environment(device), "model": args.model or "SmolLM2-135M-Instruct (embedded GGUF)",
                "dtype": args.dtype, "seed": args.seed, "samples": args.samples, "batch_size": args.batch_size,
                "pq": args.pq, "rows": earlier}

        def save(rows: list[Row]) -> None:
            data["rows"] = earlier + [dataclasses.asdict(r) for r in rows]
            data["seconds"] = time.perf_counter() - t0
            if args.json:  # rewritten after every batch, so an interrupted run keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(data, f, indent=1)

        save(evaluate(model, tokenizer, args.tasks, args.lengths, args.budgets, args.methods, args.samples,
                      args.seed, args.batch_size, args.pq, log=lambda m: print(m, flush=True), done=done,
                      on_batch=save))
    print(table(data["rows"]))
    if "environment" in data:
        print(" ".join(f"{k}={v}" for k, v in data["environment"].items()))
    if args.plot:
        plot(data["rows"], args.plot)
    return 0
