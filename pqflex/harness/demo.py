"""``pqflex demo``: a hidden passkey in a long prompt, answered with full attention and with pqcache."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from pqflex import CACHE_KWARG, PQCache, PQConfig, PQIndex, ResidentKV, attention_backend, configure, kernel_path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


class AttentionTimer:
    """Wall time spent inside a model's attention layers (projections included), from forward hooks.

    Meaningful on the CPU, where ops run synchronously; on a GPU it would time kernel launches only.
    """

    def __init__(self, model) -> None:
        self.spent, self._t0 = 0.0, 0.0
        layers = [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]
        self._handles = [h for m in layers for h in (m.register_forward_pre_hook(self._start),
                                                     m.register_forward_hook(self._stop))]

    def _start(self, *_) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, *_) -> None:
        self.spent += time.perf_counter() - self._t0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def greedy_decode(model, first_logits: torch.Tensor, cache, max_new_tokens: int,
                  stop_ids: set[int]) -> tuple[list[int], float, float]:
    """Greedy decoding from the prefill's last logits.

    Returns the tokens, the median step time (s) and the median time of a step spent in the attention layers (s;
    NaN on a GPU, see :class:`AttentionTimer`).
    """
    tokens, steps, attention = [], [], []
    logits = first_logits
    timer = AttentionTimer(model) if logits.device.type == "cpu" else None
    try:
        with torch.no_grad():
            for _ in range(max_new_tokens):
                token = int(logits.argmax(-1))
                tokens.append(token)
                if token in stop_ids:
                    break
                ids = torch.tensor([[token]], device=logits.device)
                before = timer.spent if timer else 0.0
                out, dt = _timed(lambda: model(ids, use_cache=True, **{CACHE_KWARG: cache}), logits.device)
                logits = out.logits[:, -1]
                steps.append(dt)
                attention.append(timer.spent - before if timer else float("nan"))
    finally:
        if timer:
            timer.remove()
    return tokens, _median(steps), _median(attention)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


def index_prefilled(model, dense_cache: DynamicCache, config: PQConfig) -> tuple[PQCache, float]:
    """A :class:`PQCache` holding a copy of a dense prefill's keys and values and their PQ index.

    Returns the cache and the seconds spent building it (copy + k-means + encoding, all layers).
    """
    device = dense_cache.layers[0].keys.device
    return _timed(lambda: PQCache.from_prefill(model, dense_cache, config), device)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def passkey_demo(length: int = 4096, budget: float | int = 0.1, depth: float = 0.5, seed: int = 0,
                 model_path: str | None = None, device: str | None = None, max_new_tokens: int = 12,
                 settings: dict | None = None) -> dict:
    """Answer one passkey prompt with full attention and with pqcache on the default (or given) model.

    The prompt is prefilled once, densely (pqcache prefills densely too); the two methods then decode from the
    same prefill: SDPA over all cached tokens, and pqcache over sink + top-k + recent tokens after indexing.
    """
    from pqflex.harness.models import load_default_model, load_model
    from pqflex.harness.prompts import passkey_found, passkey_prompt

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    if model_path is None:
        model, tokenizer = load_default_model("sdpa", dtype=dtype, device=dev)
        name = "SmolLM2-135M-Instruct (embedded default)"
    else:
        model, tokenizer = load_model(model_path, "sdpa", dtype=dtype, device=dev)
        name = model_path
    load_s = time.perf_counter() - t0
    config = PQConfig(budget=budget, **(settings or {}))
    PQCache(model, config)  # checks the settings against the model (M dividing its head dim) before the prefill

    prompt = passkey_prompt(tokenizer, length, depth, seed=seed)
    ids = prompt.input_ids.to(dev)
    stop_ids = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    resolved = config.resolve_budget(prompt.n_tokens)
    print(f"model: {name} on {dev} ({dtype}), loaded in {load_s:.1f} s")
    print(f"prompt: {prompt.n_tokens} tokens, pass key {prompt.passkey} hidden at depth {depth:.0%}; prefilling...",
          flush=True)

    dense_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out, prefill_s = _timed(lambda: model(ids, use_cache=True, **{CACHE_KWARG: dense_cache}), dev)
    first = out.logits[:, -1]
    print(f"prefill done in {prefill_s:.1f} s; building the PQ index (k-means, {model.config.num_hidden_layers} "
          "layers)...", flush=True)
    pq_cache, index_s = index_prefilled(model, dense_cache, config)
    print(f"index built in {index_s:.1f} s; decoding with full attention, then with pqcache...", flush=True)
    kv_bytes = sum(_nbytes(layer.keys, layer.values) for layer in dense_cache.layers)
    index_bytes = pq_cache.pq_nbytes

    dense_tokens, dense_step, dense_attn = greedy_decode(model, first, dense_cache, max_new_tokens, stop_ids)
    configure(model, config)
    pq_tokens, pq_step, pq_attn = greedy_decode(model, first, pq_cache, max_new_tokens, stop_ids)

    attended = resolved.total if not resolved.dense else prompt.n_tokens
    print(f"prefill (dense, shared): {prefill_s:.2f} s; PQ index build (k-means {config.niter} iters + encode, "
          f"{model.config.num_hidden_layers} layers): {index_s:.2f} s")
    print(f"pqcache: M={config.M} nbits={config.nbits} budget={budget} -> sink {resolved.sink_size} + recent "
          f"{resolved.recent_size} + top-k {resolved.topk} = {attended} of {prompt.n_tokens}+ tokens attended "
          f"per KV head and step ({attended / prompt.n_tokens:.1%})")
    print(f"KV cache {kv_bytes / 2**20:.1f} MiB; PQ index (codes + centroids) {index_bytes / 2**20:.2f} MiB")
    print(f"{'':16}{'answer':36}{'found':>6}{'ms/token':>10}{'attention':>11}")
    rows = {}
    for label, tokens, step, attn in (("full attention", dense_tokens, dense_step, dense_attn),
                                      ("pqcache", pq_tokens, pq_step, pq_attn)):
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        found = passkey_found(text, prompt.passkey)
        rows[label] = dict(answer=text, found=found, ms_per_token=step * 1e3, attention_ms_per_token=attn * 1e3)
        print(f"{label:16}{text[:34]!r:36}{'yes' if found else 'no':>6}{step * 1e3:10.1f}{attn * 1e3:11.1f}")
    path = kernel_path(dev)
    print(f"(ms/token: median decode step; attention: its time inside the {model.config.num_hidden_layers} "
          f"attention layers, projections included{'' if dev.type == 'cpu' else ', CPU only'}; pqcache decodes "
          f"through the {path})")
    return {"n_tokens": prompt.n_tokens, "passkey": prompt.passkey, "attended": attended, "prefill_s": prefill_s,
            "index_s": index_s, "kv_bytes": kv_bytes, "index_bytes": index_bytes, **rows}


def synthetic_demo(n_ctx: int = 8192, budget: float | int = 0.1, seed: int = 0, settings: dict | None = None) -> dict:
    """PQ retrieval on synthetic clustered keys with a planted needle; prints the selection and the error.

    Shapes follow Llama-3.1-8B's attention (8 KV heads, 4 query heads each, head dim 128), one layer.
    """
    B, Hkv, G, D = 1, 8, 4, 128
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(Hkv, 64, D, generator=g)
    key = centers.gather(1, torch.randint(64, (Hkv, n_ctx, 1), generator=g).expand(Hkv, n_ctx, D))
    key = (key + 0.4 * torch.randn(Hkv, n_ctx, D, generator=g))[None]  # [B, Hkv, N, D]
    value = torch.randn(B, Hkv, n_ctx, D, generator=g)
    query = torch.randn(B, Hkv * G, 1, D, generator=g)
    needle = n_ctx // 3
    direction = query[0, :, 0].reshape(Hkv, G, D).mean(1)  # [Hkv, D]
    key[0, :, needle] = 2.5 * direction / direction.norm(dim=-1, keepdim=True) * key[0].norm(dim=-1).mean()

    config = PQConfig(budget=budget, **(settings or {}))
    scale = D ** -0.5
    t0 = time.perf_counter()
    index = PQIndex.build(key, config)
    t1 = time.perf_counter()
    selection = index.plan(query, n_ctx, scale)  # the token list of each KV head
    out = ResidentKV(key, value, attention_backend(config)).attend(query, selection, scale)
    t2 = time.perf_counter()
    dense = F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=True)

    b = config.resolve_budget(n_ctx)
    rel_err = ((out - dense).norm() / dense.norm()).item()
    tokens, valid = selection.token_list()
    found = ((tokens[0] == needle) & valid[0]).any(-1).tolist()
    print(f"context {n_ctx} tokens, {Hkv} KV heads x {G} query heads, head dim {D}")
    print(f"config: M={config.M} nbits={config.nbits} budget={budget} -> sink {b.sink_size} + recent "
          f"{b.recent_size} + top-k {b.topk} = {b.total} tokens per KV head ({b.total / n_ctx:.1%})")
    print(f"index build (k-means {config.niter} iters + encode): {t1 - t0:.2f} s; select + attend: "
          f"{(t2 - t1) * 1e3:.1f} ms (plain torch)")
    print(f"PQ codes: {index.codes.numel()} bytes vs {key.numel() * 2} bytes of bf16 keys")
    print(f"needle at position {needle} selected by {sum(found)}/{Hkv} KV heads")
    print(f"relative error vs dense attention: {rel_err:.4f}")
    return {"rel_err": rel_err, "needle_found": found, "budget": b._asdict()}
