"""LongBench (v1) with full attention, pqcache, sink + recent (StreamingLLM) and oracle top-k, side by side.

Usage (the jsonl files of the official ``data.zip``, e.g. ``data/hotpotqa.jsonl``)::

    python -m evals.longbench.run --data path/to/data --tasks hotpotqa,trec --budgets 0.1 --out results/
    python -m evals.longbench.run --hf --tasks qasper          # the Hugging Face dataset, when online

Protocol (:mod:`evals.longbench.protocol`): the official prompt of each task, truncated in the middle to
``--max-length`` tokens, the model's chat template except for trec, triviaqa, samsum, lsht, lcc and repobench-p,
greedy decoding of the task's number of new tokens (samsum also stops at a newline), and the official metrics
(:mod:`evals.longbench.metrics`). Every method decodes from the same dense prefill of each prompt
(:func:`pqflex.harness.evaluate.run_batch`). Writes ``predictions.jsonl``, ``scores.json`` and ``scores.md`` to
``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from evals.longbench.metrics import sample_score, task_score
from evals.longbench.protocol import MAX_NEW_TOKENS, NO_CHAT_TEMPLATE, PROMPTS, TASKS

REQUIRED_FIELDS = ("input", "context", "answers")


def load_task(task: str, data: str | None, limit: int | None) -> list[dict[str, Any]]:
    """The rows of one task: ``DATA/<task>.jsonl``, or the Hugging Face dataset ``THUDM/LongBench`` (``data=None``)."""
    if task not in TASKS:
        raise ValueError(f"unknown LongBench task {task!r}; allowed: {TASKS}")
    if data is None:
        from datasets import load_dataset

        rows = [dict(r) for r in load_dataset("THUDM/LongBench", task, split="test")]
    else:
        path = Path(data) / f"{task}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no {path}: --data must hold the jsonl files of LongBench's data.zip")
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise ValueError(f"{task} row {i} lacks {missing}; LongBench rows have {REQUIRED_FIELDS} and more")
    return rows[:limit] if limit is not None else rows


def build_prompt(tokenizer, task: str, row: dict[str, Any], max_length: int) -> list[int]:
    """Token ids of one prompt: the task template, middle truncation to ``max_length``, then the chat rule."""
    prompt = PROMPTS[task].format(context=row["context"], input=row["input"])
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) > max_length:
        half = max_length // 2
        prompt = (tokenizer.decode(ids[:half], skip_special_tokens=True)
                  + tokenizer.decode(ids[-half:], skip_special_tokens=True))
    if task not in NO_CHAT_TEMPLATE and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def run(model, tokenizer, tasks: list[str], data: str | None, methods: list[str], budgets: list[float | int],
        max_length: int, limit: int | None = None, batch_size: int = 1, log=print) -> list[dict[str, Any]]:
    """Predictions and official scores of every task, method and budget; one row per sample and run."""
    from pqflex.harness.evaluate import run_batch
    from pqflex.harness.suite import Sample

    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    out = []
    for task in tasks:
        rows = load_task(task, data, limit)
        samples = [Sample(task, tuple(build_prompt(tokenizer, task, r, max_length)), tuple(r["answers"]),
                          MAX_NEW_TOKENS[task], i) for i, r in enumerate(rows)]

        def scorer(text: str, s: Sample, rows=rows, task=task) -> float:
            return sample_score(task, text, list(s.answers), rows[s.seed].get("all_classes"))

        for start in range(0, len(samples), batch_size):
            t0 = time.perf_counter()
            batch = run_batch(model, tokenizer, samples[start:start + batch_size], methods, budgets,
                              stop_ids={newline} if task == "samsum" else set(), scorer=scorer)
            for r in batch:
                r.length = r.n_tokens
                out.append({**dataclasses.asdict(r), "_id": rows[r.seed].get("_id")})
            log(f"{task} {min(start + batch_size, len(samples))}/{len(samples)}: {time.perf_counter() - t0:.1f} s")
    return out


def _label(r: dict[str, Any]) -> str:
    return "full" if r["budget"] is None else f"{r['method']} {r['budget']}"


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{method label: {task: official task score, ..., "avg": mean over tasks}}``."""
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        scores[_label(r)][r["task"]].append(r["score"])
    table = {}
    for label, per_task in scores.items():
        table[label] = {t: task_score(v) for t, v in per_task.items()}
        table[label]["avg"] = round(sum(table[label].values()) / len(per_task), 2)
    return table


def markdown(summary: dict[str, dict[str, float]], counts: dict[str, int]) -> str:
    tasks = [t for t in TASKS if any(t in v for v in summary.values())]
    lines = ["| method | " + " | ".join(f"{t} (n={counts[t]})" for t in tasks) + " | avg |",
             "|---" * (len(tasks) + 2) + "|"]
    for label, per_task in summary.items():
        lines.append(f"| {label} | " + " | ".join(f"{per_task.get(t, float('nan')):.2f}" for t in tasks)
                     + f" | {per_task['avg']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pqflex import METHODS, parse_budget

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="directory of the official jsonl files (<task>.jsonl)")
    source.add_argument("--hf", action="store_true", help="load THUDM/LongBench with datasets (needs the network)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated (default: all 21)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--budgets", default="0.1", help="comma-separated fractions or token counts (default 0.1)")
    parser.add_argument("--max-length", type=int, default=7500,
                        help="prompt tokens before truncation in the middle (default 7500: an 8K-context model)")
    parser.add_argument("--limit", type=int, default=None, help="first N samples of each task")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--model", default=None, help="Hugging Face model directory (default: the embedded "
                                                      "SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", required=True, help="directory for predictions.jsonl, scores.json, scores.md")
    args = parser.parse_args(argv)

    import torch

    from pqflex.harness.bench import environment
    from pqflex.harness.models import load_default_model, load_model

    tasks = args.tasks.split(",")
    methods = args.methods.split(",")
    for t in tasks:
        if t not in TASKS:
            parser.error(f"unknown task {t!r}; allowed: {', '.join(TASKS)}")
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; allowed: {', '.join(METHODS)}")
    budgets = [parse_budget(b) for b in args.budgets.split(",")]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = (load_model(args.model, "sdpa", device=device) if args.model
                        else load_default_model("sdpa", device=device, progress=False))
    rows = run(model, tokenizer, tasks, None if args.hf else args.data, methods, budgets, args.max_length,
               args.limit, args.batch_size, log=lambda m: print(m, file=sys.stderr, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    summary = summarize(rows)
    counts = defaultdict(int)
    for r in rows:
        if r["method"] == rows[0]["method"] and r["budget"] == rows[0]["budget"]:
            counts[r["task"]] += 1
    table = markdown(summary, counts)
    (out / "scores.md").write_text(table + "\n", encoding="utf-8")
    with open(out / "scores.json", "w") as f:
        json.dump({"environment": environment(device), "args": vars(args), "scores": summary}, f, indent=1)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
