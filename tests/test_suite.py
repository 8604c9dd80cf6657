"""The offline long-context suite (`pqflex eval`): deterministic prompts of the requested length, scoring, runner."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pqflex import PQConfig
from pqflex.harness.cli import main
from pqflex.harness.evaluate import evaluate, method_runs, summarize, table
from pqflex.harness.models import materialize_default_model
from pqflex.harness.suite import TASKS, make_sample, score, vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(materialize_default_model(progress=False))


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=8192,
                      attn_implementation="sdpa", pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_fit_the_length_and_hold_their_answers(tokenizer, task):
    words = vocabulary(tokenizer)
    n = 2100  # cwe's 300 common-word entries alone take ~1750 tokens
    a, b = make_sample(tokenizer, task, n, 3, words), make_sample(tokenizer, task, n, 3, words)
    assert a == b and make_sample(tokenizer, task, n, 4, words) != a
    assert n - 50 <= a.n_tokens <= n
    text = tokenizer.decode(a.input_ids)
    assert all(ans in text for ans in a.answers)  # the needles (or listed words) are in the prompt
    assert a.max_new_tokens > 0 and len(a.answers) >= 1


def test_score_is_the_fraction_of_answers_found():
    assert score(" 1234 and 5678.", ("1234", "5678")) == 1.0
    assert score("Abc, xyz", ("ABC", "def")) == 0.5
    assert score("nothing", ("1",)) == 0.0


def test_bad_task_and_length_raise(tokenizer):
    with pytest.raises(ValueError, match="unknown task 'ruler'"):
        make_sample(tokenizer, "ruler", 1000, 0)
    with pytest.raises(ValueError, match="n_tokens=30 is too short"):
        make_sample(tokenizer, "niah_single", 30, 0)
    with pytest.raises(ValueError, match="n_tokens=1500 is too short for this task's instruction"):
        make_sample(tokenizer, "cwe", 1500, 0)
    with pytest.raises(ValueError, match="unknown method 'h2o'"):
        PQConfig.for_method("h2o")


def test_methods_share_one_budget_accounting():
    for method in ("pqcache", "streaming", "oracle"):
        b = PQConfig.for_method(method, budget=0.1).resolve_budget(4096)
        assert b.total == 409 and not b.dense
    assert PQConfig.for_method("streaming", budget=0.1).resolve_budget(4096).topk == 0
    assert PQConfig.for_method("full").resolve_budget(4096).dense
    with pytest.raises(ValueError, match="method 'oracle' fixes \\['scorer'\\]"):
        PQConfig.for_method("oracle", scorer="pq")
    with pytest.raises(ValueError, match="unknown PQConfig setting\\(s\\) \\['k'\\]"):
        PQConfig.for_method("pqcache", k=3)
    assert method_runs(["full", "pqcache", "oracle"], [0.2, 0.1]) == [
        ("full", None), ("pqcache", 0.2), ("oracle", 0.2), ("pqcache", 0.1), ("oracle", 0.1)]


def test_runner_every_method_batched_equals_one_by_one(tiny_model, tokenizer):
    args = (tiny_model, tokenizer, ["passkey", "niah_multivalue"], [1200], [0.2], ["full", "pqcache", "streaming",
                                                                                 "oracle"], 2)
    one = evaluate(*args, batch_size=1, log=lambda m: None)
    two = evaluate(*args, batch_size=2, log=lambda m: None)  # left padding: prompts differ in length
    assert len(one) == 2 * 2 * 4
    def key(r):
        return r.task, r.seed, r.method

    assert sorted((key(r), r.prediction) for r in one) == sorted((key(r), r.prediction) for r in two)
    rows = [r.__dict__ for r in one]
    summary = summarize(rows)
    assert set(summary) == {(1200, "full"), (1200, "pqcache 0.2"), (1200, "streaming 0.2"), (1200, "oracle 0.2")}
    assert "| 1200 | full |" in table(rows) and "samples per cell: 2" in table(rows)


def test_cli_writes_json_and_resumes(tmp_path, capsys):
    out = tmp_path / "suite.json"
    base = ["eval", "--lengths", "1100", "--budgets", "0.2", "--methods", "full,streaming", "--samples", "1",
            "--json", str(out)]
    assert main(base + ["--tasks", "passkey"]) == 0
    first = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in first] == ["full", "streaming"]
    assert main(base + ["--tasks", "passkey,vt", "--resume"]) == 0  # passkey is kept, vt is added
    rows = json.loads(out.read_text())["rows"]
    assert rows[:2] == first and [r["task"] for r in rows[2:]] == ["vt", "vt"]
    assert main(["eval", "--from-json", str(out)]) == 0
    assert "| 1100 | streaming 0.2 |" in capsys.readouterr().out
