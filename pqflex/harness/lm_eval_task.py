"""An offline lm-eval task of passkey prompts: ``pqflex lm-eval-task DIR``, then ``lm_eval --include_path DIR``.

lm-eval's own long-context tasks download their data (RULER's essays, LongBench); this one is generated locally
with the model's tokenizer, so ``lm_eval --model hf ... attn_implementation=pqcache`` runs with no network::

    pqflex lm-eval-task /tmp/lme --prompts 10 --length 2048
    lm_eval --model hf --model_args pretrained=$(pqflex model),attn_implementation=pqcache,pq_budget=0.1 \\
        --tasks pqflex_passkey --include_path /tmp/lme --device cpu --batch_size 1

Prompt ``i`` hides its pass key at depth ``0.05 + 0.9 * i / (prompts - 1)`` (seed ``i``); the score is the exact
match of the first number the model generates (``exact_match,first-number``).
"""

from __future__ import annotations

import json
from pathlib import Path

TASK = "pqflex_passkey"
TASK_YAML = """task: pqflex_passkey
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: first-number
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_task(directory: str | Path, tokenizer, prompts: int, length: int,
               depths: list[float] | None = None) -> Path:
    """Write ``passkey.jsonl`` and ``pqflex_passkey.yaml`` into ``directory``; returns the directory.

    Args:
        directory: created if missing.
        tokenizer: the tokenizer of the model that will be evaluated (prompt lengths are counted in its tokens).
        prompts: how many prompts; length: tokens per prompt.
        depths: the needle's relative depth in each prompt (default: evenly from 0.05 to 0.95).
    """
    from pqflex.harness.prompts import passkey_prompt

    if prompts < 1 or length < 64:
        raise ValueError(f"need prompts >= 1 and length >= 64 tokens, got prompts={prompts}, length={length}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if depths is None:
        depths = [0.05 + 0.9 * i / max(prompts - 1, 1) for i in range(prompts)]
    with open(root / "passkey.jsonl", "w") as f:
        for i, depth in enumerate(depths):
            p = passkey_prompt(tokenizer, length, depth, seed=i)
            f.write(json.dumps({"prompt": tokenizer.decode(p.input_ids[0], skip_special_tokens=True),
                                "answer": p.passkey}) + "\n")
    (root / f"{TASK}.yaml").write_text(TASK_YAML.format(data=(root / "passkey.jsonl").resolve()))
    return root
