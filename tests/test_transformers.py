"""The transformers integration on tiny random-weight models (no downloads)."""

import contextlib
from unittest import mock

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import (AttentionInterface, AutoModelForCausalLM, FalconConfig, LlamaConfig, MistralConfig,
                          Qwen2Config, Qwen3Config)

import pqflex
from pqflex import PQCache, PQConfig
from pqflex import index as pq_index
from pqflex.integrations import transformers as pq_tf

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=None, bos_token_id=None,
            pad_token_id=0)
ARCHS = {
    "llama": lambda: LlamaConfig(**TINY),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY),
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=16),
}
# Falcon's attention goes through transformers' attention interface from 5.25 on (before, pqcache refuses it:
# tests/test_robustness.py). Its GQA layout ("new decoder architecture", 2 KV heads) and its multi-query one.
FALCON_ROUTED = Version(transformers.__version__).release >= (5, 25)
FALCON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
              max_position_embeddings=4096, eos_token_id=None, bos_token_id=None, pad_token_id=0,
              initializer_range=0.2)  # at the default 0.02 the tiny model emits one token whatever it attends
if FALCON_ROUTED:
    ARCHS["falcon"] = lambda: FalconConfig(**FALCON, new_decoder_architecture=True, num_kv_heads=2)
    ARCHS["falcon-mqa"] = lambda: FalconConfig(**FALCON, multi_query=True)
SPARSE = PQConfig(budget=48, sink_size=4, min_context=0, niter=8)
CACHE_KW = pq_tf.CACHE_KWARG


def make(arch, impl="pqcache", seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(ARCHS[arch](), attn_implementation=impl).eval()


def twins(arch):
    """The same random weights with pqcache and with sdpa attention."""
    pq = make(arch)
    dense = make(arch, "sdpa")
    dense.load_state_dict(pq.state_dict())
    return pq, dense


def generate(model, ids, n=12, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)[:, ids.shape[1]:]


def prompt(n, batch=1, seed=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_registered_and_loadable(tmp_path):
    assert "pqcache" in AttentionInterface().valid_keys()
    make("llama", "sdpa").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="pqcache")
    assert model.config._attn_implementation == "pqcache"
    other = AutoModelForCausalLM.from_pretrained(tmp_path)
    other.set_attn_implementation("pqcache")
    assert other.config._attn_implementation == "pqcache"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_budget_covering_context_is_token_identical_to_sdpa(arch):
    pq, dense = twins(arch)
    ids = prompt(200, batch=2)
    expected = generate(dense, ids)
    pqflex.configure(pq, PQConfig(budget=1.0))
    assert torch.equal(generate(pq, ids), expected)
    assert torch.equal(generate(pq, ids, **{CACHE_KW: PQCache(pq)}), expected)
    # The default config keeps contexts below min_context dense.
    pqflex.configure(pq)
    assert torch.equal(generate(pq, ids), expected)


def _spy_plan():
    """Counts the tokens each decode step attends per sequence and KV head (its planned token list)."""
    counts = []
    original = pq_index.PQIndex.plan

    def plan(self, *args, **kwargs):
        selection = original(self, *args, **kwargs)
        if selection.middle is not None:
            counts.append(selection.token_list()[1].sum(-1))  # [B, Hkv]
        return selection

    @contextlib.contextmanager
    def spy():
        with mock.patch.object(pq_index.PQIndex, "plan", plan):
            yield

    return counts, spy()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_small_budget_attends_exactly_the_budget(arch):
    pq, dense = twins(arch)
    ids = prompt(300)
    pqflex.configure(pq, SPARSE)
    counts, spy = _spy_plan()
    with spy:
        out = generate(pq, ids)
        out_cache = generate(pq, ids, **{CACHE_KW: PQCache(pq)})
    assert len(counts) == 2 * 2 * 11  # two runs x layers x decode steps
    assert all((c == SPARSE.budget).all() for c in counts)
    assert torch.equal(out, out_cache)
    logits_dense = dense(torch.cat([ids, out[:, :-1]], 1)).logits[:, -1]
    assert not torch.equal(out, generate(dense, ids)) or not torch.allclose(
        pq(torch.cat([ids, out[:, :-1]], 1)).logits[:, -1], logits_dense)


def test_pqcache_owns_state_and_keeps_its_own_config():
    pq = make("llama")
    pqflex.configure(pq, PQConfig(budget=1.0))
    cache = PQCache(pq, SPARSE)
    counts, spy = _spy_plan()
    with spy:
        generate(pq, prompt(300), **{CACHE_KW: cache})
    assert all((c == SPARSE.budget).all() for c in counts)
    assert all(layer.index is not None and layer.index.num_tokens == 311 for layer in cache.pq_layers)
    assert len(cache.pq_layers) == 2 and not any("_pqflex_state" in vars(m) for m in pq.modules())
    assert pqflex.get_config(pq).budget == 1.0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_left_padded_batch_matches_sequences_alone(arch):
    pq = make(arch)
    pqflex.configure(pq, PQConfig(budget=0.25, sink_size=4, min_context=200, niter=8))
    lengths = [400, 260, 150]  # the last one stays dense (below min_context)
    N = max(lengths)
    ids = prompt(N, batch=3, seed=5)
    mask = torch.arange(N)[None, :] >= torch.tensor([N - n for n in lengths])[:, None]
    cache = PQCache(pq)
    batched = generate(pq, ids.masked_fill(~mask, 0), attention_mask=mask.long(), **{CACHE_KW: cache})
    assert cache.pq_layers[1].index.start.tolist() == [N - n for n in lengths]
    for b, n in enumerate(lengths):
        assert torch.equal(batched[b], generate(pq, ids[b:b + 1, N - n:])[0]), f"row {b}"


def test_multi_token_steps_after_decoding_match_single_steps():
    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    ids = prompt(260)
    with torch.no_grad():
        chunked = pq(ids[:, :200], use_cache=True)
        chunked = pq(ids[:, 200:201], use_cache=True, **{CACHE_KW: chunked.past_key_values})  # decoding starts
        chunk = pq(ids[:, 201:], use_cache=True, **{CACHE_KW: chunked.past_key_values}).logits
        single = pq(ids[:, :200], use_cache=True)
        cache, steps = single.past_key_values, []
        for t in range(200, 260):
            out = pq(ids[:, t:t + 1], use_cache=True, **{CACHE_KW: cache})
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(chunk, torch.cat(steps[1:], 1), rtol=1e-4, atol=1e-4)


def test_second_generate_starts_fresh():
    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    a, b = prompt(300, seed=7), prompt(250, seed=8)
    first_b = generate(pq, b)
    generate(pq, a)
    assert torch.equal(generate(pq, b), first_b)
    fresh = make("llama")
    pqflex.configure(fresh, SPARSE)
    assert torch.equal(generate(fresh, b), first_b)


def test_transformers_static_cache_is_refused():
    pq = make("llama")
    with pytest.raises(RuntimeError, match="call pqflex.configure"):  # its first forward: the cache is unseen
        generate(pq, prompt(20), cache_implementation="static")
    pqflex.configure(pq)
    with pytest.raises(NotImplementedError, match="pqflex.PQStaticCache; got StaticCache"):
        generate(pq, prompt(20), cache_implementation="static")


@pytest.mark.parametrize("config,match", [
    (lambda: MistralConfig(**TINY, sliding_window=64), "sliding_window=64"),
    (lambda: Qwen2Config(**TINY, use_sliding_window=True, sliding_window=64, max_window_layers=1),
     "sliding_attention"),
])
def test_unsupported_models_raise_naming_the_class(config, match):
    model = AutoModelForCausalLM.from_config(config(), attn_implementation="pqcache").eval()
    with pytest.raises(NotImplementedError, match=match) as err:
        generate(model, prompt(20))
    assert "Attention" in str(err.value)
    with pytest.raises(NotImplementedError, match=match):
        pqflex.configure(model)
    with pytest.raises(NotImplementedError, match=match):
        PQCache(model)


def test_model_without_standard_attention_raises():
    with pytest.raises(NotImplementedError, match="Linear has no transformers attention layers"):
        pqflex.configure(torch.nn.Linear(2, 2))


def test_configure_switches_implementation_and_validates():
    model = make("llama", "sdpa")
    pqflex.configure(model, SPARSE)
    assert model.config._attn_implementation == "pqcache"
    assert pqflex.get_config(model) is SPARSE
    with pytest.raises(TypeError, match="pqflex.PQConfig"):
        pqflex.configure(model, {"budget": 0.1})
    with pytest.raises(TypeError, match="pqflex.PQConfig"):
        PQCache(model, 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cuda_generation(arch):
    pq, dense = (m.cuda() for m in twins(arch))
    ids = prompt(300, batch=2).cuda()
    pqflex.configure(pq, PQConfig(budget=1.0))
    assert torch.equal(generate(pq, ids), generate(dense, ids))
    pqflex.configure(pq, SPARSE)
    counts, spy = _spy_plan()
    with spy:
        out = generate(pq.to(torch.bfloat16), ids, **{CACHE_KW: PQCache(pq)})
    assert out.shape == (2, 12) and all((c == SPARSE.budget).all() for c in counts)


@pytest.mark.parametrize("first", ["pqflex", "transformers"])
def test_import_pqflex_registers_pqcache_in_either_order(first):
    """``import pqflex`` is light (no torch) and still registers "pqcache" before any model is built, whether
    transformers' model code is loaded before or after it."""
    import subprocess
    import sys

    order = (["import pqflex, sys", "assert 'torch' not in sys.modules", "import transformers.modeling_utils"]
             if first == "pqflex" else ["import transformers.modeling_utils", "import pqflex"])
    code = "\n".join([*order, "from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig",
                      "assert 'pqcache' in AttentionInterface().valid_keys()",
                      "m = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, "
                      "intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2), "
                      "attn_implementation='pqcache')",
                      "import pqflex.ops, torch",
                      "print(m.config._attn_implementation, torch.ops.pqflex.pq_select)"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "pqcache pqflex.pq_select" in done.stdout, done.stderr[-2000:]
