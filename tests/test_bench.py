"""`pqflex bench` smoke test on the CPU: the tiny preset, every method, JSON and table output."""

import json

import pytest

from pqflex.harness import bench
from pqflex.harness.cli import main


def test_bench_tiny_preset_runs_every_method(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--contexts", "1200", "--new-tokens", "2", "--warmup", "1",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["results"]] == list(bench.METHODS)
    for r in data["results"]:
        assert r["context"] == 1200 and r["steps"] == 2 and r["tpot_ms"] > 0 and r["ttft_s"] > 0
        assert r["gen_tpot_ms"] > 0 and r["gen_ttft_s"] > 0  # through model.generate()
    assert [r["budget"] for r in data["results"]] == [0.1, 0.1, 1.0, 1.0, 1.0]
    offload = data["results"][1]
    assert 0 < offload["kv_gib"] < data["results"][0]["kv_gib"] and 0 <= offload["hit_rate"] <= 1
    assert data["environment"]["torch"] and "| tiny | pqcache | 1 | 1200 |" in capsys.readouterr().out
    assert main(["bench", "--from-json", str(out)]) == 0  # re-print an earlier run


def test_bench_block_selection_runs_and_is_recorded(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--contexts", "1200", "--new-tokens", "2", "--warmup", "1",
                 "--methods", "pqcache", "--selection", "block", "--block-size", "16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["selection"], data["block_size"], data["backend"]) == ("block", 16, "fused")  # the default
    assert data["results"][0]["tpot_ms"] > 0


def test_cli_presets_and_methods_are_the_benchs():
    from pqflex.harness import cli

    assert cli.BENCH_METHODS == bench.METHODS and set(cli.PRESETS) == set(bench.PRESETS)


@pytest.mark.parametrize("preset", sorted(bench.PRESETS))
def test_presets_have_real_shapes(preset):
    cfg = bench.model_config(preset)
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    if preset == "llama-3.1-8b":
        assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
            32, 32, 8, 128)
