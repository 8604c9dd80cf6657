"""Long generations (issue #29): does PQ selection drift as generated keys pile up?

Full attention generates ``--new`` tokens greedily after a context of ``--context`` tokens. Each method is then
teacher-forced over that sequence, one decode step at a time, from a copy of the same dense prefill
(:meth:`pqflex.PQCache.from_prefill`), and each window of ``--window`` steps reports:

- ``top1``: the share of steps whose next-token argmax equals full attention's;
- ``kl``: ``KL(full || method)`` of the next-token distribution (nats), the mean over the window's steps;
- ``recall`` (PQ-scored methods): per layer, KV head and step, the share of the exact top-k that the PQ selection
  kept: ``|PQ top-k ∩ exact top-k| / |exact top-k|``, where the exact top-k takes the same candidates, budget and GQA
  aggregation scored by exact ``q . k``; averaged over heads and steps, per layer, and the mean over layers;
- ``recall_prompt``: the same with the candidates cut to the prompt's tokens (a pool that does not grow, keys
  encoded with the centroids trained on them): what changes there comes from the queries alone;
- ``recall_generated``: of the exact top-k's generated tokens (keys encoded with the prompt's centroids), the share
  the PQ selection kept (steps and heads whose exact top-k holds none are left out).

Generated keys are encoded with the prompt's centroids (no re-clustering), so a recall that decays over the window
index is the drift that other papers report. The context: pqflex's own source files, then an instruction that asks
for a long answer (offline, and real code for a code model).

Usage::

    python -m evals.long_generation --model qwen2.5-coder-1.5b --context 16384 --new 8192 --window 512 \\
        --methods pqcache:0.1,pqcache:2048,oracle:0.1 --device cuda --dtype bf16 --json evals/results/long_gen.json \\
        --plot evals/results/long_gen.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache

import pqflex
from pqflex import CACHE_KWARG, PQCache, PQConfig
from pqflex.config import parse_budget
from pqflex.harness.bench_report import environment
from pqflex.harness.models import load_model
from pqflex.harness.named_models import NAMES, materialize_model
from pqflex.integrations.attention import pqcache_attention_forward
from pqflex.ops import portable

INSTRUCTION = ("\n\n# Task: write a thorough test suite for every public function and class in the files above, one "
               "test function after another, each with a docstring.\n\nimport pytest\n")


def context_ids(tokenizer, n: int) -> torch.Tensor:
    """``[1, n]`` token ids: pqflex's source files (repeated if short) cut to ``n`` tokens minus the instruction."""
    root = Path(pqflex.__file__).parent
    text = "\n\n".join(f"# file: {p.relative_to(root.parent)}\n{p.read_text()}" for p in sorted(root.rglob("*.py")))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    tail = tokenizer(INSTRUCTION, add_special_tokens=False).input_ids
    if n <= len(tail):
        raise ValueError(f"--context must exceed the instruction's {len(tail)} tokens, got {n}")
    while len(ids) < n - len(tail):
        ids = ids + ids
    return torch.tensor([ids[:n - len(tail)] + tail])


class RecallProbe:
    """Recall of the PQ selection against the exact top-k, per layer, at every one-token pqcache step while active.

    It wraps transformers' ``"pqcache"`` attention function (re-registered under that name inside :meth:`active`):
    after pqflex's step, the layer's index selects again for the same query (the same top-k the step used) and the
    exact scores of the cached keys select under the same candidates, budget and GQA aggregation."""

    def __init__(self, prompt: int) -> None:
        self.prompt = prompt  # tokens of the prompt: positions >= prompt were generated
        self.step: dict[int, dict[str, float]] = {}  # layer -> recalls at the current step

    @contextlib.contextmanager
    def active(self) -> Iterator[RecallProbe]:
        AttentionInterface.register("pqcache", self._attention)
        try:
            yield self
        finally:
            AttentionInterface.register("pqcache", pqcache_attention_forward)

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out = pqcache_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        cache = kwargs.get("pqflex_cache")
        state = getattr(cache, "pq_state", None)
        layer = None if state is None else state.layers.get(module.layer_idx)
        index = None if layer is None else layer.index
        if query.shape[-2] == 1 and index is not None and index.quantizer is not None and index.k_max > 0:
            scale = query.shape[-1] ** -0.5 if scaling is None else scaling
            self.step[module.layer_idx] = selection_recall(index, query, key, scale, self.prompt)
        return out


def selection_recall(index, query: torch.Tensor, key: torch.Tensor, scale: float, prompt: int) -> dict[str, float]:
    """Recalls of a decode step's ``query [B, H, 1, D]`` over ``key [B, Hkv, n, D]`` (every cached token, the new
    one included): ``all`` (mean over sequences and KV heads of ``|PQ top-k ∩ exact top-k| / |exact top-k|``),
    ``prompt`` (both selections over the candidates before position ``prompt`` only) and ``generated`` (of the exact
    top-k's tokens at ``prompt`` and after, the share PQ kept; NaN if there are none)."""
    n = key.shape[-2]
    B, H, _, D = query.shape
    Hkv = key.shape[1]
    pq = index.topk_tokens(query, n, scale)  # [B, Hkv, W]: the step's own selection
    q = query.reshape(B, Hkv, H // Hkv, D)
    exact_scores = torch.einsum("bhgd,bhnd->bhgn", q.float(), key.float()) * scale
    lo, hi = portable.candidate_range(index.spans, n, n)
    exact = portable.select_from_scores(exact_scores, lo, hi, index.topk, index.k_max)
    cut = hi.clamp(max=prompt)
    pq_prompt = portable.select_from_scores(index.scores(q, scale), lo, cut, index.topk, index.k_max)
    exact_prompt = portable.select_from_scores(exact_scores, lo, cut, index.topk, index.k_max)
    return {"all": overlap(pq, exact, n), "prompt": overlap(pq_prompt, exact_prompt, n),
            "generated": overlap(pq, torch.where(exact >= prompt, exact, -1), n)}


def overlap(selected: torch.Tensor, wanted: torch.Tensor, n: int) -> float:
    """Mean over ``[B, Hkv]`` of the share of ``wanted``'s tokens (``-1`` = empty slot) found in ``selected``; rows
    with nothing wanted are left out (NaN if none has any)."""
    def marks(idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*idx.shape[:-1], n + 1, dtype=torch.bool, device=idx.device)
        return out.scatter_(-1, torch.where(idx >= 0, idx.long(), n), True)[..., :n]

    got, want = marks(selected), marks(wanted)
    count = want.sum(-1)
    share = (got & want).sum(-1) / count.clamp(min=1)
    return share[count > 0].float().mean().item() if bool((count > 0).any()) else math.nan


@torch.no_grad()
def run(model, ids: torch.Tensor, new_tokens: int, window: int, methods: list[tuple],
        settings: dict[str, Any] | None = None, log=print, generated: list[int] | None = None) -> dict[str, Any]:
    """Generate ``new_tokens`` with full attention after ``ids``, teacher-force each method; rows per window.

    ``methods``: ``(method, budget)`` or ``(method, budget, {setting: value})`` (PQConfig fields on top of
    ``settings`` for that method alone, e.g. ``{"refresh": 256}``). ``generated``: full attention's tokens from an
    earlier run of the same model and context (``data["generated"]``), instead of generating them again."""
    settings = settings or {}
    model.set_attn_implementation("sdpa")
    t0 = time.perf_counter()
    if generated is not None:
        if len(generated) < new_tokens:
            raise ValueError(f"the given generation holds {len(generated)} tokens, fewer than new_tokens={new_tokens}")
        seq = torch.tensor([generated[:new_tokens]], device=ids.device)
    else:
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)[:, ids.shape[1]:]
        log(f"full attention generated {new_tokens} tokens in {time.perf_counter() - t0:.0f} s")
    C = ids.shape[1]
    dense = DynamicCache(config=model.config)
    model(ids, **{CACHE_KWARG: dense}, logits_to_keep=1)
    prefilled = DynamicCache(config=model.config)  # a copy for each method's PQCache.from_prefill
    for i, layer in enumerate(dense.layers):
        prefilled.update(layer.keys.clone(), layer.values.clone(), i)
    steps = new_tokens - 1  # step t feeds generated token t and predicts token t + 1
    full_logp = []  # per window: [w, vocab] log-probabilities of full attention, teacher-forced in one forward
    for t0 in range(0, steps, window):
        chunk = seq[:, t0:min(t0 + window, steps)]
        full_logp.append(F.log_softmax(model(chunk, **{CACHE_KWARG: dense}).logits[0].float(), -1))
    rows = []
    for method, budget, *extra in methods:
        extra = extra[0] if extra else {}
        config = PQConfig.for_method(method, **{**settings, **extra}, **({} if method == "full" else {"budget": budget}))
        pqflex.configure(model, config)
        cache = PQCache.from_prefill(model, prefilled, config)
        probe = RecallProbe(C)
        t0 = time.perf_counter()
        with probe.active():
            for w, full in enumerate(full_logp):
                top1, kl, recalls = [], [], []
                for i in range(full.shape[0]):
                    t = w * window + i
                    probe.step.clear()
                    logits = model(seq[:, t:t + 1], **{CACHE_KWARG: cache}).logits[0, -1].float()
                    logp = F.log_softmax(logits, -1)
                    top1.append(float(logp.argmax() == full[i].argmax()))
                    kl.append(float((full[i].exp() * (full[i] - logp)).sum()))
                    if probe.step:
                        recalls.append([probe.step[k] for k in sorted(probe.step)])
                per_layer = {kind: _per_layer(recalls, kind) for kind in ("all", "prompt", "generated")}
                rows.append(dict(method=method, budget=budget, settings=extra, label=_label(method, budget, extra),
                                 refreshes=_refreshes(cache), window=w, first_step=w * window,
                                 steps=full.shape[0], context=C, top1=statistics.fmean(top1), kl=statistics.fmean(kl),
                                 recall=_mean(per_layer["all"]), recall_prompt=_mean(per_layer["prompt"]),
                                 recall_generated=_mean(per_layer["generated"]),
                                 recall_per_layer=per_layer["all"]))
                r = rows[-1]
                shown = " ".join(f"{k} {'-' if r[k] is None else format(r[k], '.3f')}"
                                 for k in ("recall", "recall_prompt", "recall_generated"))
                log(f"{r['label']}: window {w} (steps {r['first_step']}..): top1 {r['top1']:.3f} kl "
                    f"{r['kl']:.4f} {shown}")
        log(f"{_label(method, budget, extra)}: teacher-forced {steps} steps in {time.perf_counter() - t0:.0f} s")
    model.set_attn_implementation("sdpa")
    return dict(context=C, new_tokens=new_tokens, window=window, rows=rows, generated=seq[0].tolist())


def _label(method: str, budget: float | int, extra: dict[str, Any]) -> str:
    return " ".join([method, str(budget), *(f"{k}={v}" for k, v in extra.items())])


def _refreshes(cache: PQCache) -> int:
    """Index refreshes so far (PQConfig.refresh): the first layer's, tokens past its build over the interval."""
    layer = cache.pq_layers[0] if cache.pq_layers else None
    if layer is None or not layer.config.refresh:
        return 0
    return (layer.refreshed_at - layer.prompt_tokens) // layer.config.refresh


def _per_layer(recalls: list[list[dict[str, float]]], kind: str) -> list[float]:
    """Per layer, the mean over steps of one kind of recall (NaN steps left out; NaN if all are)."""
    if not recalls:
        return []
    out = []
    for j in range(len(recalls[0])):
        values = [r[j][kind] for r in recalls if not math.isnan(r[j][kind])]
        out.append(statistics.fmean(values) if values else math.nan)
    return out


def _mean(values: list[float]) -> float | None:
    """The mean of the non-NaN values; None if there are none."""
    kept = [v for v in values if not math.isnan(v)]
    return statistics.fmean(kept) if kept else None


def plot(data: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    recalls = {"recall": "-", "recall_prompt": "--", "recall_generated": ":"}  # line style of each kind
    for key, ax in zip(("top1", "kl", "recall"), axes):
        for i, label in enumerate(dict.fromkeys(r["label"] for r in data["rows"])):
            for kind, style in (recalls.items() if key == "recall" else [(key, "-")]):
                rows = [r for r in data["rows"] if r["label"] == label and r.get(kind) is not None]
                if rows:  # one color per method, one line style per kind of recall
                    ax.plot([r["first_step"] + r["steps"] / 2 for r in rows], [r[kind] for r in rows], marker="o",
                            linestyle=style, color=f"C{i}", label=label if key != "recall" else f"{label}: {kind}")
        ax.set_xlabel("generated tokens")
        ax.set_title({"top1": "top-1 agreement with full attention", "kl": "KL(full || method), nats",
                      "recall": "recall of the exact top-k (mean over layers)"}[key])
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{data.get('model', '')}: {data['context']}-token context, {data['new_tokens']} generated")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _methods(text: str) -> list[tuple[str, float | int, dict[str, Any]]]:
    """``METHOD[:BUDGET[:KEY=VALUE...]],...`` e.g. ``pqcache:0.1,pqcache:0.1:refresh=256`` (ints, floats or words);
    ``none``: generate only (for ``--reuse`` in a later run)."""
    out = []
    if text == "none":
        return out
    for item in text.split(","):
        method, budget, *pairs = item.split(":") + [""] * (":" not in item)
        extra = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or not key:
                raise ValueError(f"a method setting must be KEY=VALUE, got {pair!r} in {item!r}")
            extra[key] = _value(value)
        out.append((method, parse_budget(budget or "0.1"), extra))
    return out


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help=f"a model directory or one of {', '.join(NAMES)}")
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--new", type=int, default=8192, help="tokens full attention generates")
    p.add_argument("--window", type=int, default=512, help="steps per reported window")
    p.add_argument("--methods", type=_methods, default=_methods("pqcache:0.1,pqcache:2048,oracle:0.1"),
                   help="METHOD:BUDGET[:KEY=VALUE...],... (methods of PQConfig.for_method, PQConfig fields for that "
                        "method, e.g. pqcache:0.1:refresh=256; none: only generate)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=["bf16", "fp32"])
    p.add_argument("--reuse", default=None,
                   help="a JSON of an earlier run (same model, context and dtype): teacher-force its generation "
                        "instead of generating again")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    a = p.parse_args(argv)
    if a.new < 2 or a.window < 1:
        p.error(f"--new must be >= 2 and --window >= 1, got {a.new} and {a.window}")
    path = materialize_model(a.model) if a.model in NAMES else a.model
    model, tokenizer = load_model(path, "sdpa", {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype], a.device)
    ids = context_ids(tokenizer, a.context).to(a.device)
    generated = None
    if a.reuse:
        earlier = json.loads(Path(a.reuse).read_text())
        mismatch = {k: (earlier.get(k), v) for k, v in (("model", str(a.model)), ("context", a.context),
                                                         ("dtype", a.dtype)) if earlier.get(k) != v}
        if mismatch or "generated" not in earlier:
            p.error(f"--reuse {a.reuse}: not a run of the same model, context and dtype with its generation "
                    f"(differs: {mismatch or 'no generated tokens'})")
        generated = earlier["generated"]
    data = run(model, ids, a.new, a.window, a.methods, generated=generated)
    data.update(model=str(a.model), dtype=a.dtype, environment=environment(a.device),
                command="python -m evals.long_generation " + " ".join(argv if argv is not None else __import__(
                    "sys").argv[1:]))
    if a.json:
        Path(a.json).write_text(json.dumps(data, indent=1))
    if a.plot:
        plot(data, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
