"""RULER through lm-eval, as users type it (issue #29, item 2): one ``lm_eval --model hf`` command per method and
context length, then one table of the scores.

The tasks are the RULER tasks of lm-eval that generate their prompts offline (the essay-haystack ones download
text). Each (method, length) runs as its own command with ``--metadata '{"max_seq_lengths":[L]}'`` and
``--limit N``, because lm-eval's RULER tasks put every length's samples into one document list and ``--limit``
takes the first ones. Methods (``METHOD[:BUDGET]``):

- ``full``: transformers' SDPA (``attn_implementation=sdpa``);
- ``pqcache:B``, ``oracle:B``, ``streaming:B``: ``attn_implementation=pqcache,pq_method=...,pq_budget=B`` (the
  default ``PQConfig()``, exact top-k of the true scores, sink + recent), B a fraction or a token count.

Usage::

    python -m evals.ruler --model qwen2.5-coder-1.5b --lengths 4096,8192,16384,32768 --limit 50 \\
        --device cuda --dtype bfloat16 --out evals/results/ruler_qwen1.5b
    python -m evals.ruler --out evals/results/ruler_qwen1.5b --table-only   # the table of what has run

``--dry-run`` prints the commands. Results land under ``OUT/<method>/<length>/`` (lm-eval's own JSON); a
(method, length) that has a result is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from pqflex.config import parse_budget
from pqflex.harness.named_models import NAMES, materialize_model

TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
METHODS = ("full", "pqcache:0.1", "pqcache:2048", "oracle:0.1", "oracle:2048", "streaming:0.1")
PQ_METHODS = ("pqcache", "oracle", "streaming")


def model_args(method: str, pretrained: str, dtype: str) -> str:
    """lm-eval's ``--model_args`` for ``method`` (``full`` or ``METHOD:BUDGET``)."""
    name, _, budget = method.partition(":")
    base = f"pretrained={pretrained},dtype={dtype}"
    if name == "full":
        if budget:
            raise ValueError(f"method {method!r}: full attention takes no budget")
        return base + ",attn_implementation=sdpa"
    if name not in PQ_METHODS or not budget:
        raise ValueError(f"method {method!r}: expected full or one of {PQ_METHODS} with a budget, e.g. pqcache:0.1")
    parse_budget(budget)  # a clear error for a bad budget, before any run
    return base + f",attn_implementation=pqcache,pq_method={name},pq_budget={budget}"


def lm_eval_program() -> str:
    """The ``lm_eval`` beside this Python (a virtual environment that is not activated), else the one on PATH."""
    beside = Path(sys.executable).parent / "lm_eval"
    return str(beside) if beside.exists() else "lm_eval"


def command(method: str, length: int, pretrained: str, dtype: str, device: str, limit: int, out: Path,
            tasks: tuple[str, ...] = TASKS) -> list[str]:
    """The ``lm_eval`` command of one method at one context length."""
    return [lm_eval_program(), "--model", "hf", "--model_args", model_args(method, pretrained, dtype),
            "--tasks", ",".join(tasks), "--metadata", json.dumps({"max_seq_lengths": [length]}),
            "--limit", str(limit), "--device", device, "--batch_size", "1",
            "--output_path", str(result_dir(out, method, length))]


def result_dir(out: Path, method: str, length: int) -> Path:
    return out / method.replace(":", "_") / str(length)


def scores(out: Path, method: str, length: int) -> dict[str, float] | None:
    """Each task's score (0-100) of a finished run, or None if it has not run."""
    files = sorted(result_dir(out, method, length).glob("*/results_*.json"))
    if not files:
        return None
    results = json.loads(files[-1].read_text())["results"]
    return {task: 100.0 * float(r[f"{length},none"]) for task, r in results.items() if f"{length},none" in r}


def table(out: Path, methods: list[str], lengths: list[int]) -> str:
    """A markdown table: each method's average over the tasks at each length, and its ratio to full attention."""
    avg: dict[tuple[str, int], float | None] = {}
    for m in methods:
        for n in lengths:
            s = scores(out, m, n)
            avg[m, n] = sum(s.values()) / len(s) if s else None
    lines = ["| method | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for m in methods:
        cells = []
        for n in lengths:
            a, full = avg[m, n], avg.get(("full", n))
            if a is None:
                cells.append("-")
            elif m != "full" and full:
                cells.append(f"{a:.1f} ({a / full:.0%})")
            else:
                cells.append(f"{a:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _list(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help=f"a model directory or one of {sorted(NAMES)}")
    p.add_argument("--methods", type=_list, default=list(METHODS), help="comma-separated, METHOD[:BUDGET]")
    p.add_argument("--lengths", type=lambda t: [int(x) for x in _list(t)], default=[4096, 8192, 16384, 32768])
    p.add_argument("--tasks", type=_list, default=list(TASKS))
    p.add_argument("--limit", type=int, default=50, help="samples per task and length")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--table-only", action="store_true", help="print the table of the runs under --out")
    a = p.parse_args(argv)
    for m in a.methods:
        model_args(m, "MODEL", a.dtype)  # every method's error before the first run
    if not a.table_only:
        pretrained = a.model if os.path.isdir(a.model) or a.dry_run else str(materialize_model(a.model))
        for n in a.lengths:
            for m in a.methods:
                if scores(a.out, m, n) is not None:
                    continue
                cmd = command(m, n, pretrained, a.dtype, a.device, a.limit, a.out, tuple(a.tasks))
                print(shlex.join(cmd), flush=True)
                if not a.dry_run:
                    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
                    rc = subprocess.call(cmd, env=env)
                    if rc:
                        print(f"evals.ruler: {m} at {n} failed (exit {rc})", file=sys.stderr)
                        return rc
    print(table(a.out, a.methods, a.lengths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
