"""evals/long_generation.py (issue #29): teacher-forced agreement, KL and selection recall over a long generation,
on a tiny random model."""

import math

import pytest
import torch

import pqflex
from evals import long_generation as lg
from tests.test_transformers import make, prompt

COARSE = dict(sink_size=4, min_context=0, niter=4, M=2, nbits=2)  # 4 centroids per sub-space: PQ misses some


def test_overlap_counts_the_wanted_tokens_found():
    selected = torch.tensor([[[0, 3, 5, -1], [1, 2, -1, -1]]])  # [B=1, Hkv=2, W=4]
    wanted = torch.tensor([[[3, 5, 7, -1], [-1, -1, -1, -1]]])  # the second head wants nothing: left out
    assert lg.overlap(selected, wanted, 8) == pytest.approx(2 / 3)
    assert math.isnan(lg.overlap(selected, torch.full_like(wanted, -1), 8))


def test_a_long_generation_report_per_window():
    """Full attention teacher-forced against itself (budget 1.0) agrees at every step with KL 0; pqcache at a small
    budget reports a recall in [0, 1] per layer; the oracle (exact scores) has no PQ recall to report."""
    model = make("llama")
    ids = prompt(400)
    data = lg.run(model, ids, 13, 5, [("full", 0.1), ("pqcache", 48), ("oracle", 48)],
                  COARSE, log=lambda *_: None)
    rows = data["rows"]
    assert [(r["method"], r["window"], r["steps"]) for r in rows] == [
        (m, w, s) for m in ("full", "pqcache", "oracle") for w, s in ((0, 5), (1, 5), (2, 2))]
    for r in rows[:3]:  # full attention through pqflex's dense path equals sdpa's teacher-forced logits
        assert r["top1"] == 1.0 and r["kl"] == pytest.approx(0.0, abs=1e-5) and r["recall"] is None
    for r in rows[3:6]:
        assert 0.0 < r["recall"] < 1.0 and len(r["recall_per_layer"]) == model.config.num_hidden_layers
        assert 0.0 < r["recall_prompt"] < 1.0 and 0.0 <= r["top1"] <= 1.0 and r["kl"] > 0.0
        assert r["recall_generated"] is None or 0.0 <= r["recall_generated"] <= 1.0
    assert all(r["recall"] is r["recall_prompt"] is r["recall_generated"] is None for r in rows[6:])
    assert model.config._attn_implementation == "sdpa"  # left as found
    assert pqflex.integrations.attention.pqcache_attention_forward is not None


def test_recall_is_one_where_the_pq_scores_rank_as_the_exact_ones(monkeypatch):
    """The probe compares against the exact top-k: with the probe's PQ selection replaced by the exact scores' it
    finds all of it (where the coarse PQ selection above finds a share)."""
    model = make("llama")
    real = lg.selection_recall

    def exact_as_pq(index, query, key, scale, prompt):
        B, H, _, D = query.shape
        q = query.reshape(B, key.shape[1], H // key.shape[1], D).float()
        index.topk_tokens = lambda query, n, scale: pqflex.ops.portable.select_from_scores(
            torch.einsum("bhgd,bhnd->bhgn", q, key.float()) * scale,
            *pqflex.ops.portable.candidate_range(index.spans, n, n), index.topk, index.k_max)
        try:  # for the probe's selection only; the step itself ran with PQ scores
            return real(index, query, key, scale, prompt)
        finally:
            del index.topk_tokens

    monkeypatch.setattr(lg, "selection_recall", exact_as_pq)
    data = lg.run(model, prompt(400), 8, 5, [("pqcache", 48)], COARSE,
                  log=lambda *_: None)
    assert [r["recall"] for r in data["rows"]] == [1.0, 1.0]
    assert [r["recall_generated"] for r in data["rows"]] in ([1.0, 1.0], [None, 1.0], [1.0, None], [None, None])


def test_context_ids_are_the_sources_then_the_instruction():
    from pqflex.harness.models import find_default_gguf
    from transformers import AutoTokenizer

    gguf = find_default_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = lg.context_ids(tok, 3000)
    assert ids.shape == (1, 3000) and tok.decode(ids[0, -30:]).endswith("import pytest\n")
    with pytest.raises(ValueError, match="--context must exceed the instruction's"):
        lg.context_ids(tok, 10)


def test_the_three_recalls_meet_at_the_ends_of_the_prompt():
    """With every cached token counted as generated (prompt 0), the generated tokens' recall is the whole recall;
    with every token counted as prompt, the prompt pool's recall is the whole recall and nothing is generated."""
    torch.manual_seed(0)
    B, H, Hkv, D, n = 2, 8, 2, 16, 600
    key = torch.randn(B, Hkv, n, D)
    query = torch.randn(B, H, 1, D)
    index = pqflex.PQIndex.build(key[:, :, :n - 1], pqflex.PQConfig(budget=64, sink_size=4, min_context=0, niter=4,
                                                                     M=2, nbits=2))
    index.append(key[:, :, n - 1:])
    whole = lg.selection_recall(index, query, key, D ** -0.5, prompt=n)
    assert 0.0 < whole["all"] < 1.0 and whole["prompt"] == pytest.approx(whole["all"])
    assert math.isnan(whole["generated"])
    all_generated = lg.selection_recall(index, query, key, D ** -0.5, prompt=0)
    assert all_generated["generated"] == pytest.approx(whole["all"]) and all_generated["all"] == whole["all"]
    half = lg.selection_recall(index, query, key, D ** -0.5, prompt=n // 2)
    assert 0.0 <= half["prompt"] <= 1.0 and 0.0 <= half["generated"] <= 1.0


def test_a_method_with_its_own_settings_and_a_reused_generation():
    """``(method, budget, {setting: value})``: PQConfig(refresh=4) for that method alone (the refreshes are counted
    per window); a second run teacher-forced on the first's generation reports the same rows."""
    model = make("llama")
    methods = [("pqcache", 48), ("pqcache", 48, {"refresh": 4})]
    data = lg.run(model, prompt(400), 9, 4, methods, COARSE, log=lambda *_: None)
    assert [(r["label"], r["refreshes"]) for r in data["rows"]] == [
        ("pqcache 48", 0), ("pqcache 48", 0), ("pqcache 48 refresh=4", 0), ("pqcache 48 refresh=4", 1)]
    plain, refreshed = data["rows"][1], data["rows"][3]  # steps 4..7: after the refresh at 404 cached tokens
    assert plain["recall"] != refreshed["recall"]
    assert len(data["generated"]) == 9
    again = lg.run(model, prompt(400), 9, 4, methods, COARSE, log=lambda *_: None, generated=data["generated"])
    assert again["rows"] == data["rows"]
    with pytest.raises(ValueError, match="holds 9 tokens, fewer than new_tokens=12"):
        lg.run(model, prompt(400), 12, 4, methods, COARSE, log=lambda *_: None, generated=data["generated"])


def test_method_specs_parse_with_settings():
    assert lg._methods("pqcache:0.1,oracle:2048,pqcache:0.1:refresh=256:refresh_niter=10:backend=gather") == [
        ("pqcache", 0.1, {}), ("oracle", 2048, {}),
        ("pqcache", 0.1, {"refresh": 256, "refresh_niter": 10, "backend": "gather"})]
    assert lg._methods("none") == []
    with pytest.raises(ValueError, match="KEY=VALUE, got 'refresh'"):
        lg._methods("pqcache:0.1:refresh")
