"""pqcache on the real embedded default model (SmolLM2-135M-Instruct, CPU): the passkey answer of full attention."""

import pytest
import torch

import pqflex
from pqflex.harness.models import load_default_model
from pqflex.harness.prompts import passkey_found, passkey_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    return load_default_model("sdpa")


def _answer(model, tokenizer, prompt, cache=None):
    caches = {} if cache is None else {pqflex.integrations.transformers.CACHE_KWARG: cache}
    with torch.no_grad():
        out = model.generate(prompt.input_ids, attention_mask=prompt.attention_mask, max_new_tokens=8,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, **caches)
    return tokenizer.decode(out[0, prompt.n_tokens:], skip_special_tokens=True)


@pytest.mark.parametrize("depth", [0.2, 0.5, 0.8])
def test_pqcache_at_one_fifth_budget_gives_full_attentions_passkey_answer(model_and_tokenizer, depth):
    model, tokenizer = model_and_tokenizer
    prompt = passkey_prompt(tokenizer, 2048, depth, seed=int(depth * 10))
    model.set_attn_implementation("sdpa")
    dense = _answer(model, tokenizer, prompt)
    pqflex.configure(model, pqflex.PQConfig(budget=0.2))
    cache = pqflex.PQCache(model)
    sparse = _answer(model, tokenizer, prompt, cache)
    index = cache.pq_layers[0].index
    assert index is not None and int(index.topk[0]) > 0, "the sparse path did not run"
    assert passkey_found(dense, prompt.passkey), f"full attention missed the passkey: {dense!r}"
    assert passkey_found(sparse, prompt.passkey), f"pqcache answered {sparse!r}, full attention {dense!r}"
