"""A local lm-eval task of passkey prompts (generate_until, no downloads), for `lm_eval --include_path DIR`.

Usage::

    python evals/lm_eval_passkey.py DIR --prompts 10 --length 2048
    lm_eval --model hf --model_args pretrained=PATH,attn_implementation=pqcache,pq_budget=0.1 \\
        --tasks pqflex_passkey --include_path DIR --device cpu --batch_size 1

Prompt ``i`` hides its pass key at depth ``0.05 + 0.9 * i / (prompts - 1)`` (seed ``i``); the score is the exact
match of the first number the model generates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    """Write ``passkey.jsonl`` and ``pqflex_passkey.yaml`` into ``directory``; returns the directory."""
    from pqflex.harness.prompts import passkey_prompt

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if depths is None:
        depths = [0.05 + 0.9 * i / max(prompts - 1, 1) for i in range(prompts)]
    with open(root / "passkey.jsonl", "w") as f:
        for i, depth in enumerate(depths):
            p = passkey_prompt(tokenizer, length, depth, seed=i)
            f.write(json.dumps({"prompt": tokenizer.decode(p.input_ids[0], skip_special_tokens=True),
                                "answer": p.passkey}) + "\n")
    (root / "pqflex_passkey.yaml").write_text(TASK_YAML.format(data=(root / "passkey.jsonl").resolve()))
    return root


def main() -> None:
    from transformers import AutoTokenizer

    from pqflex.harness.models import materialize_default_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--model", default=None, help="model directory whose tokenizer to use (default: SmolLM2)")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model or materialize_default_model(progress=False))
    print(write_task(args.directory, tokenizer, args.prompts, args.length))


if __name__ == "__main__":
    main()
