"""evals/ruler.py (issue #29, item 2): the lm-eval RULER commands per method and length, and their table."""

import json

import pytest

from evals import ruler
from pqflex.harness.models import materialize_default_model


def test_each_method_is_the_model_args_a_user_types():
    assert ruler.model_args("full", "M", "bfloat16") == "pretrained=M,dtype=bfloat16,attn_implementation=sdpa"
    assert ruler.model_args("pqcache:0.1", "M", "bfloat16").endswith(
        "attn_implementation=pqcache,pq_method=pqcache,pq_budget=0.1")
    assert ruler.model_args("oracle:2048", "M", "float32").endswith("pq_method=oracle,pq_budget=2048")
    assert ruler.model_args("streaming:0.1", "M", "float32").endswith("pq_method=streaming,pq_budget=0.1")
    for bad, why in (("pqcache", "with a budget"), ("dense:0.1", "expected full"), ("full:0.1", "no budget")):
        with pytest.raises(ValueError, match=why):
            ruler.model_args(bad, "M", "float32")
    with pytest.raises(ValueError, match="budget"):
        ruler.model_args("pqcache:-3", "M", "float32")


def test_one_command_per_method_and_length(tmp_path, capsys):
    assert ruler.main(["--model", "MODEL", "--out", str(tmp_path), "--dry-run", "--lengths", "4096,8192",
                       "--methods", "full,pqcache:2048", "--limit", "50"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "--model hf" in line]
    assert len(lines) == 4
    assert all("--limit 50" in line and ",".join(ruler.TASKS) in line for line in lines)
    assert sum('{"max_seq_lengths": [8192]}' in line for line in lines) == 2
    assert str(tmp_path / "pqcache_2048" / "4096") in lines[1]


def fake_result(out, method, length, values):
    d = ruler.result_dir(out, method, length) / "model"
    d.mkdir(parents=True)
    results = {t: {f"{length},none": v, f"{length}_stderr,none": "N/A", "4096,none": -1} for t, v in values.items()}
    (d / "results_2026.json").write_text(json.dumps({"results": results}))


def test_the_table_averages_the_tasks_and_compares_with_full_attention(tmp_path):
    fake_result(tmp_path, "full", 8192, {"a": 1.0, "b": 0.8})
    fake_result(tmp_path, "pqcache:0.1", 8192, {"a": 0.9, "b": 0.72})
    text = ruler.table(tmp_path, ["full", "pqcache:0.1", "oracle:0.1"], [8192])
    assert "| full | 90.0 |" in text and "| pqcache:0.1 | 81.0 (90%) |" in text and "| oracle:0.1 | - |" in text


def test_a_real_run_on_the_default_model(tmp_path, capsys):
    """The real lm-eval CLI, one RULER task at 1024 tokens, one sample, full attention and pqcache."""
    pytest.importorskip("lm_eval")
    model = str(materialize_default_model(progress=False))
    assert ruler.main(["--model", model, "--out", str(tmp_path), "--lengths", "1024", "--tasks", "niah_single_1",
                       "--methods", "full,pqcache:0.1", "--limit", "1", "--device", "cpu", "--dtype", "float32"]) == 0
    for method in ("full", "pqcache:0.1"):
        got = ruler.scores(tmp_path, method, 1024)
        assert set(got) == {"niah_single_1"} and 0 <= got["niah_single_1"] <= 100
    assert "| full |" in capsys.readouterr().out
