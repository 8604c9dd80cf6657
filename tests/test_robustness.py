"""Odd inputs: each is a clear error naming the value, or a correct result (issue #13)."""

from unittest import mock

import pytest
import torch

import pqflex
from pqflex import PQCache, PQConfig, PQIndex, PQStaticCache, ProductQuantizer, retrieval_attention
from pqflex.integrations import lm_eval as lm_eval_glue

from tests.test_transformers import CACHE_KW, FALCON_ROUTED, SPARSE, generate, make, prompt


def test_padded_row_shorter_than_the_sink_next_to_a_sparse_row():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=g)
    k, v = torch.randn(2, 2, 1100, 16, generator=g), torch.randn(2, 2, 1100, 16, generator=g)
    mask = torch.ones(2, 1100, dtype=torch.bool)
    mask[1, :1080] = False  # 20 tokens: fewer than sink_size=32
    out = retrieval_attention(q, k, v, PQConfig(niter=2), kv_mask=mask)
    alone = retrieval_attention(q[1:], k[1:, :, 1080:], v[1:, :, 1080:], PQConfig(niter=2))
    torch.testing.assert_close(out[1:], alone)
    torch.testing.assert_close(out[:1], retrieval_attention(q[:1], k[:1], v[:1], PQConfig(niter=2)))


def test_config_is_validated_against_the_model_when_configuring():
    model = make("llama")  # head dim 8
    bad = PQConfig(M=3, budget=48, sink_size=4, min_context=0)
    for build in (lambda: pqflex.configure(model, bad), lambda: PQCache(model, bad),
                  lambda: PQStaticCache(model, 400, bad)):
        with pytest.raises(ValueError, match="PQConfig.M=3 does not divide the head dim 8"):
            build()
    model.set_attn_implementation("pqcache")
    with pytest.raises(ValueError, match="PQConfig.M=3 does not divide the head dim 8"):
        lm_eval_glue.apply(model, {"M": 3})
    for seed in (2**63, 2**64 - 1, 2**64):  # 2**63 .. 2**64 - 1 passed once and failed at the first decode step
        with pytest.raises(ValueError, match=rf"PQConfig.seed={seed} is out of range; allowed: \[0, {2**63 - 1}\]"):
            PQConfig(seed=seed)
    top = SPARSE.replace(seed=2**63 - 1)  # the largest seed builds and decodes
    pqflex.configure(model, top)
    assert generate(model, prompt(300), n=2).shape == (1, 2)
    assert generate(model, prompt(300), n=2, **{CACHE_KW: PQStaticCache(model, 310)}, disable_compile=True).shape == (1, 2)


def test_static_cache_misuse_says_what_to_do():
    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    cache = PQStaticCache(pq, 256)
    with torch.no_grad(), pytest.raises(ValueError, match=r"holds 256 tokens per sequence: 256 cached \+ 1 new do not fit"):
        generate(pq, prompt(250), n=10, **{CACHE_KW: cache}, disable_compile=True)
    cache.reset()
    generate(pq, prompt(200), n=4, **{CACHE_KW: cache}, disable_compile=True)
    with torch.no_grad(), pytest.raises(NotImplementedError, match=r"call cache.reset\(\) first"):
        pq(prompt(30), **{CACHE_KW: cache})  # a new prompt without reset
    cache.reset()
    with torch.no_grad(), pytest.raises(ValueError, match="holds batches of 1 sequences, got 2"):
        pq(prompt(30, batch=2), **{CACHE_KW: cache})


def test_no_kmeans_when_every_sequence_stays_dense():
    pq = make("llama")
    pqflex.configure(pq, PQConfig(min_context=1024))
    with mock.patch.object(ProductQuantizer, "train", side_effect=AssertionError("k-means ran")):
        out = generate(pq, prompt(300), n=4)
        index = PQIndex.build(torch.randn(1, 2, 300, 8), PQConfig(min_context=1024))
    assert out.shape == (1, 4) and index.dense and index.quantizer is None and index.codes.shape[-1] == 0


def test_non_finite_keys_never_reach_the_centroids():
    g = torch.Generator().manual_seed(2)
    k = torch.randn(1, 2, 600, 16, generator=g)
    cfg = PQConfig(budget=60, sink_size=8, min_context=0, niter=4, M=2, nbits=4)
    clean = PQIndex.build(k, cfg)
    poisoned = k.clone()
    poisoned[0, :, 2] = float("nan")  # a sink token
    poisoned[0, 0, 590] = float("inf")  # a recent token
    mask = torch.ones(1, 600, dtype=torch.bool)
    index = PQIndex.build(poisoned, cfg)
    assert torch.isfinite(index.quantizer.centroids).all()
    torch.testing.assert_close(index.quantizer.centroids, clean.quantizer.centroids)
    poisoned[0, 1, 300] = float("nan")  # a middle token: excluded from training, not a collapsed head
    index = PQIndex.build(poisoned, cfg, mask)
    centroids = index.quantizer.centroids
    assert torch.isfinite(centroids).all()
    assert len(torch.unique(index.codes[0, 1, 8:560, 0])) > 4


def test_unsupported_families_raise_one_sentence_naming_the_class():
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, FalconConfig, T5Config

    t5 = AutoModelForSeq2SeqLM.from_config(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                    num_heads=2, decoder_start_token_id=0),
                                           attn_implementation="pqcache")
    with pytest.raises(NotImplementedError, match=r"position_bias=a tensor of shape \(1, 2, 10, 10\) \(T5Attention\)") as err:
        t5.generate(torch.randint(3, 60, (1, 10)), max_new_tokens=2)
    assert "tensor([" not in str(err.value) and len(str(err.value)) < 200
    falcon = AutoModelForCausalLM.from_config(FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=4))
    if FALCON_ROUTED:  # served (tests/test_transformers.py runs it as an ARCHS entry); ALiBi Falcon is refused
        alibi = AutoModelForCausalLM.from_config(FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                                              num_attention_heads=4, alibi=True),
                                                 attn_implementation="pqcache")
        for build in (lambda: pqflex.configure(alibi), lambda: PQCache(alibi),
                      lambda: generate(alibi, prompt(10), n=2)):
            with pytest.raises(NotImplementedError, match=r"ALiBi position bias .*\(FalconAttention, config.alibi\)"):
                build()
        pqflex.configure(falcon)
        return
    for build in (lambda: pqflex.configure(falcon), lambda: PQCache(falcon)):
        with pytest.raises(NotImplementedError, match="FalconForCausalLM has no transformers attention layers"):
            build()


@pytest.mark.parametrize("kmeans", ["reference", "op"])
def test_kmeans_ignores_non_finite_values_at_masked_points(kmeans):
    """The k-means op itself masks by selection: NaN/inf at masked-out points change nothing."""
    from pqflex.ops import portable

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 300, 4, generator=g)
    mask = torch.rand(2, 300, generator=g) > 0.2
    run = portable.kmeans if kmeans == "reference" else torch.ops.pqflex.kmeans
    clean = run(x, mask, 16, 4, 0, 0.0)
    poisoned = x.clone()
    poisoned[~mask] = float("nan")
    poisoned[~mask & (torch.arange(300) % 2 == 0)] = float("inf")
    torch.testing.assert_close(run(poisoned, mask, 16, 4, 0, 0.0), clean)
