"""`pqflex bench` smoke test on the CPU: the tiny preset, every method, JSON and table output; tensor parallelism
(``--tp``) on two ranks; an out-of-memory error recorded as a row."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import pqflex
from pqflex.harness import bench, bench_launch, bench_measure
from pqflex.harness.cli import main


def test_bench_tiny_preset_runs_every_method(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--contexts", "1200", "--new-tokens", "2", "--warmup", "1",
                 "--methods", "all", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["results"]] == [m for m in bench.METHODS if m != "flashinfer"]  # CUDA only
    for r in data["results"]:
        assert r["context"] == 1200 and r["steps"] == 2 and r["tpot_ms"] > 0 and r["ttft_s"] > 0
        assert r["gen_tpot_ms"] > 0 and r["gen_ttft_s"] > 0  # through model.generate()
    assert [r["budget"] for r in data["results"]] == [0.1, 0.1, 1.0, 1.0, 1.0]
    offload = data["results"][1]
    for r in data["results"]:  # every row's byte floor at the copy bandwidth measured at the start
        bytes_ = sum(bench.decode_step_bytes(bench.build_model("tiny", "sdpa", torch.float32, "meta"), r["method"],
                                             1, 1200, 0.1, {}).values())
        assert r["step_gb"] == pytest.approx(bytes_ / 1e9)
        assert r["floor_ms"] == pytest.approx(bytes_ / (float(data["environment"]["copy_GBps"]) * 1e9) * 1e3, rel=0.02)
    assert 0 < offload["kv_gib"] < data["results"][0]["kv_gib"] and 0 <= offload["hit_rate"] <= 1
    printed = capsys.readouterr()
    assert data["environment"]["torch"] and "| tiny | pqcache | 1 | 1 | 1200 |" in printed.out
    assert "| floor ms |" in printed.out and "copy_GBps=" in printed.out
    assert "attn µs/layer and peak GiB: measured on CUDA only" in printed.out  # why those columns hold "-"
    assert "measuring pqcache, batch 1, context 1200..." in printed.err  # progress while a row runs
    assert "--warmup 1: the first decode steps compile" in printed.err
    assert "the flashinfer row is left out: FlashInfer decodes on CUDA only, the bench runs on cpu" in printed.err
    assert main(["bench", "--from-json", str(out)]) == 0  # re-print an earlier run


def test_bench_on_the_cpu_leaves_out_the_simulated_offload_by_default(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "main", lambda args: seen.setdefault("methods", args.methods) and 0)
    main(["bench", "--preset", "tiny", "--device", "cpu"])
    assert seen["methods"] == [m for m in bench.METHODS if m not in ("pqcache-offload", "flashinfer")]


def test_bench_refuses_flashinfer_where_it_cannot_run(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--preset", "tiny", "--device", "cpu", "--methods", "flashinfer"])
    assert exit_.value.code == 2
    assert "--methods flashinfer: FlashInfer decodes on CUDA only, the bench runs on cpu" in capsys.readouterr().err


def test_flashinfer_row_model_builds_and_prefills_on_cpu():
    """The flashinfer row's attention name is one transformers takes as a registered function (a name holding
    "flash" sends transformers 5.x to its kernel hub, which failed on the H200); without a planned cache the row's
    attention is SDPA, so a prompt runs anywhere."""
    from pqflex.harness import bench_flashinfer

    bench_flashinfer.register()
    model = bench.build_model("tiny", bench_measure.attention_of("flashinfer"), torch.float32, "cpu")
    reference = bench.build_model("tiny", "sdpa", torch.float32, "cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_flashinfer_row_reads_the_static_cache_as_pages_in_place():
    """The page view and page table hand FlashInfer each sequence's first n rows of every KV head, in order, from
    the [B, Hkv, C, D] buffer itself (a view: no copy); a buffer of partial pages is refused."""
    from pqflex.harness.bench_flashinfer import PAGE, page_table, page_view

    B, Hkv, C, D = 3, 2, 4 * PAGE, 5
    buffer = torch.arange(B * Hkv * C * D, dtype=torch.float32).reshape(B, Hkv, C, D)
    view = page_view(buffer)
    assert view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    for n in (1, PAGE, PAGE + 3, C):
        indptr, indices, last = page_table(B, Hkv, C, n)
        for b in range(B):
            pages = view[indices[indptr[b]:indptr[b + 1]].long()]  # [used, Hkv, PAGE, D]
            rows = pages.transpose(0, 1).reshape(Hkv, -1, D)[:, :(len(pages) - 1) * PAGE + int(last[b])]
            torch.testing.assert_close(rows, buffer[b, :, :n], rtol=0, atol=0)
    with pytest.raises(ValueError, match="whole 16-token pages"):
        page_view(torch.zeros(1, Hkv, C + 1, D))


@pytest.mark.gpu
def test_flashinfer_decode_equals_sdpa():
    """The flashinfer row's op over the first n rows of [B, Hkv, C, D] buffers, planned as a bench step plans it,
    against SDPA in fp32: within twice bf16 SDPA's own error."""
    pytest.importorskip("flashinfer")
    from pqflex.harness.bench_flashinfer import FlashInferDecode, flashinfer_decode

    B, H, Hkv, D, C, n = 2, 32, 8, 128, 5008, 4321  # C: whole 16-token pages; n: a partial last page
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, h, *shape, D, device="cuda", dtype=torch.bfloat16, generator=g)
               for h, shape in ((H, ()), (Hkv, (C,)), (Hkv, (C,))))
    planner = FlashInferDecode(B, H, Hkv, D, C, torch.bfloat16, torch.device("cuda"))
    planner.start(n - 1)
    planner.advance()  # the step that writes token n - 1 attends n tokens
    out = flashinfer_decode(q, k, v, planner.id).float()
    planner.close()
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, None].float(), k[:, :, :n].float(),
                                                           v[:, :, :n].float(), enable_gqa=True)[:, :, 0]
    low = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k[:, :, :n], v[:, :, :n],
                                                           enable_gqa=True)[:, :, 0].float()
    assert (out - ref).abs().max() <= 2 * (low - ref).abs().max() + 1e-3


def test_offload_without_a_gpu_warns_that_it_only_simulates():
    from tests.test_transformers import SPARSE, make

    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    with pytest.warns(RuntimeWarning, match=r"offload=True\) on cpu only simulates offloading"):
        pqflex.PQStaticCache(pq, 320, SPARSE.replace(offload=True), max_batch_size=1)


def test_bench_block_selection_runs_and_is_recorded(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--contexts", "1200", "--new-tokens", "2", "--warmup", "1",
                 "--methods", "pqcache", "--selection", "block", "--block-size", "16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["selection"], data["block_size"], data["backend"]) == ("block", 16, "fused")  # the default
    assert data["results"][0]["tpot_ms"] > 0


@pytest.mark.parametrize("method", ["pqcache-offload", "sdpa-static"])
def test_bench_prefill_chunk_feeds_the_prompt_in_chunks(method):
    model = bench.build_model("tiny", "pqcache" if method in bench.PQ_METHODS else "sdpa", torch.float32, "cpu")
    lengths = []
    model.register_forward_pre_hook(lambda _, args, kwargs: lengths.append((args or [kwargs.get("input_ids")])[0]
                                                                            .shape[1]), with_kwargs=True)
    r = bench.run_method("tiny", method, 2, 600, 0.1, 2, 1, torch.float32, "cpu", {}, model=model, prefill_chunk=256,
                         compile=False)
    assert r.prefill_chunk == 256 and r.batch == 2 and r.tpot_ms > 0 and r.steps == 2 and r.compiled is False
    assert lengths[2:] == [256, 256, 88]  # after the untimed warm-up (prompt, one step); steps call forward()


def test_bench_profile_writes_a_trace_and_a_table(tmp_path):
    """Three steps of the bench's loop and three token-to-token steps of generate() (after its warm-up)."""
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--contexts", "300", "--methods", "pqcache",
                 "--new-tokens", "1", "--warmup", "1", "--profile", str(tmp_path)]) == 0
    trace = json.loads((tmp_path / "tiny_pqcache_b1_n300_rank0.json").read_text())
    steps = [e for e in trace["traceEvents"] if e.get("name") == "pqflex_decode_step"]
    assert len(steps) == 3
    assert "Self CPU" in (tmp_path / "tiny_pqcache_b1_n300_rank0.txt").read_text()
    trace = json.loads((tmp_path / "tiny_pqcache_b1_n300_rank0_generate.json").read_text())
    steps = [e for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")]
    assert len(steps) == 3 and any(e.get("name", "").startswith("pqflex::") for e in trace["traceEvents"])
    assert "Self CPU" in (tmp_path / "tiny_pqcache_b1_n300_rank0_generate.txt").read_text()


def test_bench_graphed_decodes_through_a_decode_graph(tmp_path, monkeypatch):
    import pqflex

    made = []
    real = pqflex.DecodeGraph
    monkeypatch.setattr(pqflex, "DecodeGraph", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--contexts", "300", "--methods",
                 "pqcache,sdpa-static,sdpa", "--new-tokens", "2", "--warmup", "2", "--no-generate", "--graphed",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["graphed"] for r in rows] == [True, True, False]  # sdpa (a growing cache) is not compiled
    assert [m._calls for m in made] == [4, 4] and all(r["tpot_ms"] > 0 for r in rows)
    with pytest.raises(ValueError, match="a graphed decode needs warmup >= 2 .* got 1"):
        bench.run_method("tiny", "pqcache", 1, 300, 0.1, 1, 1, torch.float32, "cpu", graphed=True)
    r = bench.run_method("tiny", "sdpa-static", 1, 300, 0.1, 1, 2, torch.float32, "cpu", graphed=True, compile=False)
    assert (r.graphed, r.compiled) == (True, False)  # --eager --graphed: the eager step captured (on CUDA)
    assert made[-1]._forward == made[-1].model.forward


def test_bench_graphed_generate_replays_the_caches_decode_graph(monkeypatch):
    """--graphed: the generate() row's PQStaticCache(graph=True) sends every decode step through its DecodeGraph."""
    from pqflex.integrations import graphs

    monkeypatch.setattr(graphs, "COMPILE_BACKEND", "eager")  # no code generation on the CPU
    calls = []
    monkeypatch.setattr(pqflex.DecodeGraph, "__call__", lambda self, *a, _f=pqflex.DecodeGraph.__call__:
                        calls.append(a[0].shape) or _f(self, *a))
    model = bench.build_model("tiny", "pqcache", torch.float32, "cpu")
    pqflex.configure(model, pqflex.PQConfig(budget=0.1))
    _, tpot, _ = bench.run_generate(model, "pqcache", 1, 300, 2, 1, "cpu", graphed=True)
    assert tpot > 0 and calls == [(1, 1)] * 3  # warm-up 1 + 2 timed gaps + 1: every token after the prompt's
    calls.clear()
    bench.run_generate(model, "pqcache", 1, 300, 2, 1, "cpu")
    assert calls == []  # not graphed: transformers' own step


def test_bench_rejects_a_bad_prefill_chunk(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--preset", "tiny", "--device", "cpu", "--prefill-chunk", "0"])
    assert exit_.value.code == 2
    assert "--prefill-chunk must be a positive number of tokens, got 0" in capsys.readouterr().err


def test_bench_refresh_needs_a_host_driven_step(capsys):
    """PQConfig(refresh) runs between steps on the host: a loop compiled by torch.compile alone is refused up front;
    --graphed (DecodeGraph) and --eager measure it (the graphed route: tests/test_refresh.py)."""
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--preset", "tiny", "--device", "cpu", "--pq", "refresh=4"])
    assert exit_.value.code == 2
    assert "--pq refresh=4 refreshes the index between decode steps on the host: add --graphed" in \
        capsys.readouterr().err


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
    if preset == "llama-3.1-70b":
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                cfg.num_key_value_heads, cfg.head_dim) == (8192, 28672, 80, 64, 8, 128)


# A sitecustomize for every Python process of the TP run (PYTHONPATH): rank 1 alone runs out of memory in the sdpa
# method, after the model's runs (as in the per-layer attention timing, which has no collectives; an OOM on one rank
# before a collective the others enter cannot be recovered, bench's docstring says so). It takes its variable out
# of the environment at once, so that the compile workers the rank spawns do not import all this too.
_OOM_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1" and os.environ.pop("PQFLEX_TEST_OOM", None):
    import torch
    from pqflex.harness import bench
    real = bench.measure
    def measure(args, method, *rest):
        r = real(args, method, *rest)
        if method == "sdpa":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated on rank 1)")
        return r
    bench.measure = measure
"""


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                 reason="tp_plan='auto' puts the ranks on the GPUs")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                                    reason="needs 2 CUDA devices")]),
])
def test_bench_tensor_parallel_two_ranks(tmp_path, device):
    (tmp_path / "sitecustomize.py").write_text(_OOM_ON_RANK_1)
    out = tmp_path / "bench.json"
    # sitecustomize imports pqflex before `-m` puts the working directory on the path: name this checkout's first.
    path = [str(tmp_path), str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path)), "PQFLEX_TEST_OOM": "1"}
    run = subprocess.run([sys.executable, "-m", "pqflex.harness.cli", "bench", "--tp", "2", "--preset", "tiny",
                          "--device", device, "--contexts", "64", "--methods", "pqcache,sdpa-static,sdpa",
                          "--new-tokens", "2", "--warmup", "1", "--no-generate", "--no-layer-attention", "--json",
                          str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["method"], r["tp"]) for r in rows] == [("pqcache", 2), ("sdpa-static", 2), ("sdpa", 2)]
    for r in rows[:2]:
        assert math.isfinite(r["tpot_ms"]) and r["tpot_ms"] > 0 and r["error"] is None
        assert len(r["peak_gib_ranks"]) == 2
    assert rows[2]["error"] == "out of memory" and math.isnan(rows[2]["tpot_ms"])  # rank 0 follows rank 1's OOM
    assert run.stdout.count("| tiny | pqcache | 2 | 1 | 64 |") == 1  # rank 0 alone prints
    assert "| tiny | sdpa | 2 | 1 | 64 | 1.0 | OOM | OOM |" in run.stdout


def test_bench_launch_shares_the_cores_between_ranks(monkeypatch):
    seen = []
    monkeypatch.setattr(bench_launch.subprocess, "run", lambda command, env: seen.append(env) or subprocess.CompletedProcess(
        command, 0))
    monkeypatch.setattr(bench_launch.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert bench.launch(["bench"], 2) == 0 and seen[-1]["OMP_NUM_THREADS"] == "8"
    assert bench.rank_threads(32) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert bench.launch(["bench"], 2) == 0 and seen[-1]["OMP_NUM_THREADS"] == "3"


def test_bench_tp_must_divide_the_heads_before_any_launch(monkeypatch, capsys):
    monkeypatch.setattr(bench, "launch", lambda *a: pytest.fail("launched"))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--tp", "3", "--preset", "tiny", "--device", "cpu"])
    assert exit_.value.code == 2
    assert "--tp 3 does not divide the 8 attention and 2 KV heads of tiny; allowed: [1, 2]" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"allowed: \[1, 2, 4, 8\]"):
        bench.check_tp("llama-3.1-70b", 16)


def test_bench_tp_must_match_the_launchers_world_size(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit):
        main(["bench", "--tp", "2", "--preset", "tiny"])
    assert "--tp 2 but the launcher started WORLD_SIZE=4 processes" in capsys.readouterr().err


def test_out_of_memory_is_a_row_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    real = bench_measure.run_method

    def run_method(preset, method, *args, **kwargs):
        if method == "pqcache":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(preset, method, *args, **kwargs)

    monkeypatch.setattr(bench_measure, "run_method", run_method)
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--contexts", "64", "--methods", "pqcache,sdpa",
                 "--new-tokens", "2", "--warmup", "1", "--no-generate", "--json", str(out)]) == 0
    oom, sdpa = json.loads(out.read_text())["results"]
    assert oom["error"] == "out of memory" and math.isnan(oom["tpot_ms"]) and oom["steps"] == 0
    assert sdpa["error"] is None and sdpa["tpot_ms"] > 0
    assert "| tiny | pqcache | 1 | 1 | 64 | 0.1 | OOM | OOM |" in capsys.readouterr().out
    assert main(["bench", "--from-json", str(out)]) == 0  # an OOM row reads back


def test_the_next_model_loads_after_the_last_ones_weights_are_freed(tmp_path, monkeypatch):
    """Under TP transformers replaces each sharded layer's forward by a closure over the layer, a reference cycle:
    a 70B model's weights then stayed on the GPU beside the next method's model (out of memory on two H200s)."""
    layers = []
    real = bench.build_model

    def load(preset, attn, dtype, device):
        assert all(ref() is None for ref in layers), "the previous model's layers are still alive"
        model = real(preset, attn, dtype, device)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                forward = module.forward
                module.forward = lambda *a, _m=module, _f=forward, **k: _f(*a, **k)  # the cycle TP makes
                layers.append(weakref.ref(module))
        return model

    monkeypatch.setattr(bench, "build_model", load)
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--contexts", "64", "--methods",
                 "pqcache,sdpa-static", "--new-tokens", "2", "--warmup", "1", "--no-generate", "--eager",
                 "--no-layer-attention", "--json", str(tmp_path / "b.json")]) == 0
    assert len(layers) == 2 * (7 * 2 + 1)  # two models of 2 layers: 7 Linear each, and the LM head


@pytest.mark.parametrize("method,budget,gb", [
    ("pqcache", 0.1, 16.06 + 1.718 + 0.302),  # weights + sink/top-k/recent rows + codes and centroids
    ("pqcache", 2048, 16.06 + 0.268 + 0.302),
    ("sdpa-static", 0.1, 16.06 + 17.18),  # every key and value
    ("pqflex-dense", 0.1, 16.06 + 17.18),
])
def test_byte_floor_of_a_decode_step_at_128k(method, budget, gb):
    """The bytes a decode step of the Llama-3.1-8B shape must read at 128K (the model built on the meta device):
    issue #28's floor, ~18.1 GB for pqcache at 1/10 (3.77 ms at the H200's 4.8 TB/s)."""
    model = bench.build_model("llama-3.1-8b", "sdpa", torch.bfloat16, "meta")
    parts = bench.decode_step_bytes(model, method, 1, 131072, budget, {})
    assert parts["weights"] == pytest.approx(16.06e9, rel=1e-3)
    assert sum(parts.values()) / 1e9 == pytest.approx(gb, rel=2e-3)
    assert bench.decode_step_bytes(model, method, 4, 131072, budget, {})["kv"] == pytest.approx(4 * parts["kv"])



def test_bench_rows_at_several_budgets(tmp_path):
    """``--budget 0.1,600``: a row of each pqcache method at each budget, one of each dense method; the byte floor
    follows the budget (600 tokens read more keys and values than 1/10 of 1200, fewer than all of them)."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--contexts", "1200", "--new-tokens", "2", "--warmup", "1", "--eager",
                 "--no-generate", "--budget", "0.1,600", "--methods", "pqcache,pqflex-dense,sdpa",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["method"], r["budget"]) for r in rows] == [("pqcache", 0.1), ("pqcache", 600), ("pqflex-dense", 1.0),
                                                          ("sdpa", 1.0)]
    assert rows[0]["step_gb"] < rows[1]["step_gb"] < rows[2]["step_gb"] == rows[3]["step_gb"]
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "tiny", "--budget", "0.1,0"])  # a bad budget of the list: refused up front


def test_kernel_breakdown_sorts_the_gpu_time_of_a_step():
    """GEMMs (cuBLAS, CUTLASS), pqflex's kernels, other libraries' attention, the rest, and idle: the wall time no
    kernel covers (two kernels running at once count once)."""
    kernels = [("nvjet_tst_128x64_64x4_2x1_v_bz_TNT", 0, 400), ("sm90_xmma_gemm_bf16bf16_bf16f32", 400, 600),
               ("_pq_select_stats_kernel", 650, 700), ("_sparse_decode_attention_kernel", 700, 760),
               ("triton_poi_fused_add_mul_0", 740, 780),  # overlaps the attention kernel by 20 us
               ("gemv2T_kernel_val<int, int, __nv_bfloat16>", 1000, 1100),
               ("void flashinfer::BatchDecodeWithPagedKVCacheKernel<...>", 1200, 1260)]  # another library's attention
    b = bench_measure.kernel_breakdown(kernels, steps=2, wall_ms=1.5)
    assert b["gemm_ms"] == pytest.approx((400 + 200 + 100) / 1e3 / 2)
    assert b["pq_ms"] == pytest.approx(110 / 1e3 / 2) and b["other_ms"] == pytest.approx(40 / 1e3 / 2)
    assert b["attn_ms"] == pytest.approx(60 / 1e3 / 2)
    busy = (600 - 0) + (780 - 650) + (1100 - 1000) + (1260 - 1200)  # the union of the intervals, in us
    assert b["idle_ms"] == pytest.approx((1500 - busy) / 1e3 / 2)
    assert b["kernels"] == 3.5
    r = bench_measure.Result("tiny", "pqcache", 1, 1200, 0.1, 1.0, 0.8, None, None, 2, breakdown=b, gen_tpot_ms=0.9)
    shown = bench.breakdown_table([r])
    assert "| pqcache | 1 | 1200 | 0.1 | loop | 0.80 | 0.35 | 0.06 | 0.03 | 0.02 |" in shown and "generate()" not in shown
    assert "| generate() | 0.90 | 0.35 |" in bench.breakdown_table([dataclasses.replace(r, gen_breakdown=b)])
    assert bench.breakdown_table([dataclasses.replace(r, breakdown=None)]) == ""
