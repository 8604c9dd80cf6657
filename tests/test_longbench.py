"""LongBench runner: the official metrics on hand-checked cases, prompt building, and a run on fixture files."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from evals.longbench import metrics
from evals.longbench.protocol import MAX_NEW_TOKENS, METRICS, NO_CHAT_TEMPLATE, PROMPTS, TASKS
from evals.longbench.run import build_prompt, load_task, main, run, summarize
from pqflex.harness.models import materialize_default_model


def test_protocol_covers_the_21_tasks():
    assert len(TASKS) == 21 and set(PROMPTS) == set(TASKS) == set(METRICS)
    assert MAX_NEW_TOKENS["gov_report"] == 512 and MAX_NEW_TOKENS["hotpotqa"] == 32
    assert set(NO_CHAT_TEMPLATE) == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}


def test_english_metrics():
    # "the" is dropped, punctuation removed: prediction {cat, sat}, reference {cat, sat, on, mat}: P=1, R=1/2.
    assert metrics.qa_f1("The cat sat.", "cat sat on the mat") == pytest.approx(2 / 3)
    assert metrics.qa_f1("dog", "cat") == 0.0
    assert metrics.rouge("a b c d", "a b c d") == pytest.approx(1.0, abs=1e-6)
    assert metrics.rouge("", "a b") == 0.0
    assert metrics.retrieval("Paragraph 3 or Paragraph 5", "Paragraph 3") == 0.5
    assert metrics.count("There are 7 unique paragraphs", 7) == 1.0 and metrics.count("none", 7) == 0.0
    assert metrics.code_sim("\n# a comment\nx = f(1)\n", "x = f(1)") == 1.0
    classes = ["Location", "Entity", "Numeric value", "Description"]
    assert metrics.classification("Location", "Location", all_classes=classes) == 1.0
    assert metrics.classification("Location or Entity", "Entity", all_classes=classes) == 0.5
    assert metrics.classification("Entity", "Location", all_classes=classes) == 0.0


def test_chinese_metrics_and_first_line_rule():
    assert metrics.qa_f1_zh("北京是中国的首都。", "北京是中国的首都") == pytest.approx(1.0)
    assert metrics.rouge_zh("今天天气很好", "今天天气很好") == pytest.approx(1.0, abs=1e-6)
    assert metrics.retrieval_zh("段落12", "段落12") == 1.0
    # trec keeps the first line only: the second class name must not count
    classes = ["Location", "Entity"]
    assert metrics.sample_score("trec", "Location\nEntity", ["Location"], classes) == 1.0
    assert metrics.sample_score("hotpotqa", "Paris", ["London", "Paris"]) == 1.0  # best over the answers
    assert metrics.task_score([1.0, 0.5]) == 75.0
    with pytest.raises(ValueError, match="unknown LongBench task 'qa'"):
        metrics.sample_score("qa", "x", ["x"])


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(materialize_default_model(progress=False))


def write_fixtures(path, tokenizer_words=400):
    """Two tasks in the official jsonl format (fields of LongBench's data.zip)."""
    filler = " ".join(f"Sentence {i} says nothing in particular about the topic." for i in range(tokenizer_words))
    rows = {
        "hotpotqa": [{"input": "Which city is the capital of France?", "context": f"{filler} Paris is the capital "
                      f"of France. {filler}", "answers": ["Paris"], "length": 3000, "dataset": "hotpotqa",
                      "language": "en", "all_classes": None, "_id": f"h{i}"} for i in range(2)],
        "trec": [{"input": "Question: Where is the Eiffel tower?\nType:", "context": "Question: Who was Kant?\n"
                  f"Type: Human being\n{filler}", "answers": ["Location"], "length": 3000, "dataset": "trec",
                  "language": "en", "all_classes": ["Human being", "Location", "Entity"], "_id": "t0"}],
    }
    for task, items in rows.items():
        with open(path / f"{task}.jsonl", "w") as f:
            for r in items:
                f.write(json.dumps(r) + "\n")
    return rows


def test_prompts_truncate_in_the_middle_and_follow_the_chat_rule(tmp_path, tokenizer):
    rows = write_fixtures(tmp_path)
    long = build_prompt(tokenizer, "hotpotqa", rows["hotpotqa"][0], 1000)
    text = tokenizer.decode(long)
    assert "<|im_start|>user" in text  # chat template for hotpotqa
    assert text.count("Answer the question based on the given passages") == 2  # head and tail both kept
    assert 1000 <= len(long) <= 1040  # the prompt body is cut to 1000 tokens, the template adds a few
    trec = tokenizer.decode(build_prompt(tokenizer, "trec", rows["trec"][0], 500))
    assert "<|im_start|>" not in trec and trec.startswith("Please determine the type")
    with pytest.raises(FileNotFoundError, match="lcc.jsonl"):
        load_task("lcc", str(tmp_path), None)
    (tmp_path / "qasper.jsonl").write_text(json.dumps({"input": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="qasper row 0 lacks \\['context'\\]"):
        load_task("qasper", str(tmp_path), None)


def test_runner_on_fixture_files(tmp_path, tokenizer):
    write_fixtures(tmp_path)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    rows = run(model, tokenizer, ["hotpotqa", "trec"], str(tmp_path), ["full", "pqcache", "streaming", "oracle"],
               [0.2], max_length=2000, log=lambda m: None)
    assert len(rows) == 3 * 4 and all(0.0 <= r["score"] <= 1.0 for r in rows)
    assert all(1024 < r["n_tokens"] <= 2000 + 40 for r in rows)  # truncated, and long enough to be sparse
    summary = summarize(rows)
    assert set(summary) == {"full", "pqcache 0.2", "streaming 0.2", "oracle 0.2"}
    assert set(summary["full"]) == {"hotpotqa", "trec", "avg"}


def test_cli_writes_predictions_and_scores(tmp_path):
    write_fixtures(tmp_path)
    out = tmp_path / "out"
    assert main(["--data", str(tmp_path), "--tasks", "trec", "--methods", "full,pqcache", "--budgets", "0.2",
                 "--max-length", "1500", "--out", str(out)]) == 0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["method"] for p in preds] == ["full", "pqcache"] and preds[0]["_id"] == "t0"
    scores = json.loads((out / "scores.json").read_text())["scores"]
    assert set(scores) == {"full", "pqcache 0.2"} and "trec (n=1)" in (out / "scores.md").read_text()
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path), "--tasks", "trex", "--out", str(out)])
