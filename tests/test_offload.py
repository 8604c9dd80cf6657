"""Offload mode (PQConfig(offload=True)): keys and values in CPU memory, sink + recent + hot rows on the device.

On a CPU-only machine both "sides" are CPU tensors, so these tests run the same code as the GPU (the device view
of pinned memory is the only CUDA-specific part; the gpu-marked tests cover it). Offload must select and attend
exactly what the GPU-resident cache does, and no row may be lost or stale.
"""

import pytest
import torch

import pqflex
from pqflex import OffloadedKV, PQConfig, PQStaticCache
from pqflex.ops import portable

from tests.test_compile import compile_config, no_recompile  # noqa: F401  (fixture)
from tests.test_transformers import CACHE_KW, SPARSE, generate, make, prompt

SMALL = SPARSE.replace(budget=64, sink_size=4)  # 30 recent + 30 top-k: 40 new tokens pass the window


def padded(n=300, batch=2, pad=23, seed=1):
    ids = prompt(n, batch=batch, seed=seed)
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, dict(attention_mask=mask)


def check_store_rows(store: OffloadedKV, n: int) -> None:
    """Every GPU row of the store holds the CPU row of the position it claims (ring, sink, hot units)."""
    B, Hkv, _, D = store.shape
    tags, start = store.tags.cpu(), store.start.cpu()
    for rows, host in ((store.rows_k.cpu(), store.host_keys), (store.rows_v.cpu(), store.host_values)):
        ring = torch.arange(max(n - store.ring, 0), n)
        assert torch.equal(rows[:, :, store.sink_max + ring % store.ring], host[:, :, ring])
        for b in range(B):
            s = int(start[b])
            sink = torch.arange(s, min(s + store.sink_max, n))
            assert torch.equal(rows[b, :, :len(sink)], host[b, :, sink])
        g = store.config.hot_block
        for b in range(B):
            for h in range(Hkv):
                for slot, unit in enumerate(tags[b, h, :store.units].tolist()):
                    if unit < 0:
                        continue
                    assert (unit + 1) * g <= n, "a hot unit holds tokens not cached yet"
                    got = rows[b, h, store.base + slot * g: store.base + (slot + 1) * g]
                    assert torch.equal(got, host[b, h, unit * g:(unit + 1) * g]), f"stale hot unit {unit}"


@pytest.mark.parametrize("hot_block,hot_ratio", [(1, 0.5), (8, 1.0), (64, 4.0), (1, 0.0)])
def test_offload_generates_what_the_resident_cache_does(hot_block, hot_ratio):
    """40 new tokens (the recent window is 30) with left padding: the same tokens, every cached key and value in
    CPU memory equal to the resident cache's, and every GPU row faithful to its position."""
    pq = make("llama")
    pqflex.configure(pq, SMALL)
    ids, mask = padded()
    resident = PQStaticCache(pq, 400)
    want = generate(pq, ids, n=40, **mask, **{CACHE_KW: resident}, disable_compile=True)
    cache = PQStaticCache(pq, 400, config=SMALL.replace(offload=True, hot_block=hot_block, hot_ratio=hot_ratio))
    assert cache.offload and not resident.offload
    got = generate(pq, ids, n=40, **mask, **{CACHE_KW: cache}, disable_compile=True)
    assert torch.equal(got, want)
    n = int(cache.get_seq_length())
    assert n == 339
    for layer, dense in zip(cache.pq_layers, resident.layers):
        store = layer.store
        assert torch.equal(store.host_keys[:, :, :n], dense.keys[:, :, :n])
        assert torch.equal(store.host_values[:, :, :n], dense.values[:, :, :n])
        check_store_rows(store, n)
        assert int(store.lookups) > 0 and (hot_ratio > 0) == (int(store.hits) > 0)
    assert 0 < cache.kv_device_nbytes < resident.kv_device_nbytes


def test_offload_step_equals_resident_step_exactly():
    """One layer runtime, clustered keys: each step's output equals the resident runtime's (same token list)."""
    torch.manual_seed(0)
    B, H, Hkv, D, N, C = 2, 8, 2, 32, 400, 512
    config = PQConfig(budget=80, sink_size=4, min_context=0, niter=4)
    key, value = torch.randn(B, Hkv, C, D), torch.randn(B, Hkv, C, D)
    n = torch.tensor(N)
    resident = pqflex.PQLayer(config, capacity=C)
    offloaded = pqflex.PQLayer(config.replace(offload=True, hot_ratio=1.0), capacity=C)
    q = torch.randn(B, H, N, D)
    resident.prefill(key, value, query=q, n=n)
    k, v = offloaded.update_kv(key[:, :, :N], value[:, :, :N], 0)
    offloaded.prefill(k, v, query=q, n=n)
    assert torch.equal(offloaded.index.codes, resident.index.codes)
    for step in range(60):
        m = N + step + 1
        q = torch.randn(B, H, 1, D)
        want = resident.forward(q, key, value, n=torch.tensor(m))
        new_k, new_v = offloaded.update_kv(key[:, :, m - 1:m], value[:, :, m - 1:m], torch.tensor(m - 1))
        got = offloaded.forward(q, new_k, new_v, n=torch.tensor(m))
        assert torch.equal(got, want), f"step {step}"
    check_store_rows(offloaded.store, N + 60)
    assert offloaded.store.hit_rate > 0


def test_offload_compiles_to_one_graph(no_recompile):  # noqa: F811
    pq = make("llama")
    config = SMALL.replace(offload=True)
    pqflex.configure(pq, config)
    ids, mask = padded()
    want = generate(pq, ids, **mask, **{CACHE_KW: PQStaticCache(pq, 320)}, disable_compile=True)
    cache = PQStaticCache(pq, 320)
    got = generate(pq, ids, **mask, **{CACHE_KW: cache}, compile_config=compile_config("eager"))
    assert torch.equal(got, want)
    assert no_recompile["stats"]["unique_graphs"] == 1 and not no_recompile["graph_break"]


@pytest.mark.parametrize("offload", [False, True])
def test_compiled_chunked_prefill_runs_the_prompt_eagerly(offload):
    """generate(prefill_chunk_size=...) sends the prompt chunks through its compiled forward (transformers does so
    on CUDA): pqflex's prompt work breaks out of the graph and runs eagerly, so the tokens equal an eager run's;
    a fullgraph compile cannot break and says why."""
    from transformers import CompileConfig

    pq = make("llama")
    pqflex.configure(pq, SMALL)
    ids = prompt(300, seed=4)
    want = generate(pq, ids, n=8, **{CACHE_KW: PQStaticCache(pq, 320)}, disable_compile=True)
    config = SMALL.replace(offload=offload)
    breaking = CompileConfig(fullgraph=False, dynamic=False, backend="eager", mode=None)
    breaking._compile_all_devices = True  # transformers compiles on accelerators only unless told
    torch._dynamo.reset()
    got = generate(pq, ids, n=8, prefill_chunk_size=128, **{CACHE_KW: PQStaticCache(pq, 320, config)},
                   compile_config=breaking)
    assert torch.equal(got, want)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="pqflex runs prompt forwards"):
        generate(pq, ids, n=8, prefill_chunk_size=128, **{CACHE_KW: PQStaticCache(pq, 320, config)},
                 compile_config=compile_config("eager"))


def test_offload_chunked_prefill_and_crop():
    pq = make("llama")
    pqflex.configure(pq, SMALL)
    ids = prompt(300, seed=4)
    want = generate(pq, ids, n=8, **{CACHE_KW: PQStaticCache(pq, 320)}, disable_compile=True)
    config = SMALL.replace(offload=True)
    got = generate(pq, ids, n=8, prefill_chunk_size=128, **{CACHE_KW: PQStaticCache(pq, 320, config)},
                   disable_compile=True)
    assert torch.equal(got, want)

    def steps(cache, tokens):
        out = []
        with torch.no_grad():
            for t in tokens.unbind(1):
                out.append(pq(t[:, None], **{CACHE_KW: cache}).logits)
        return torch.cat(out, 1)

    t = prompt(40, seed=5)
    cache, fresh = PQStaticCache(pq, 400, config), PQStaticCache(pq, 400, config)
    with torch.no_grad():
        pq(ids, **{CACHE_KW: cache})
        pq(ids, **{CACHE_KW: fresh})
    steps(cache, t[:, :36])
    cache.crop(-34)  # keep 2 of the 36 decoded tokens: positions the ring overwrote are in the window again
    steps(fresh, t[:, :2])
    assert torch.equal(steps(cache, t[:, 36:]), steps(fresh, t[:, 36:]))
    check_store_rows(cache.pq_layers[0].store, 306)


def test_offload_errors():
    pq = make("llama")
    config = SMALL.replace(offload=True)
    pqflex.configure(pq, config)
    with pytest.raises(NotImplementedError, match="offload=True\\) needs a fixed-capacity cache"):
        generate(pq, prompt(300))  # a growing cache
    with pytest.raises(NotImplementedError, match="not supported with PQConfig\\(offload=True\\)"):
        generate(pq, prompt(300), num_beams=2, **{CACHE_KW: PQStaticCache(pq, 320)}, disable_compile=True)
    with pytest.raises(ValueError, match="offload=True needs scorer='pq' and selection='token'"):
        PQConfig(offload=True, scorer="exact")
    with pytest.raises(ValueError, match="hot_ratio=-1"):
        PQConfig(hot_ratio=-1)
    with pytest.raises(ValueError, match="hot_block=0"):
        PQConfig(hot_block=0)
    store = OffloadedKV(config, (1, 2, 64, 8), torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="before setup"):
        store.write(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), 1)
    with pytest.raises(ValueError, match="70 tokens do not fit this offloaded cache of 64"):
        store.write_prompt(torch.zeros(1, 2, 70, 8), torch.zeros(1, 2, 70, 8), 0)
    with pytest.raises(ValueError, match="keys and values must be"):
        store.write_prompt(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="row and pos must be"):
        torch.ops.pqflex.offload_gather(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 9, 8),
                                        torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 3, 3, dtype=torch.long))


def test_offload_gather_reference_picks_one_source():
    dev, host = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 50, 8)
    row = torch.randint(-1, 5, (2, 3, 7))
    pos = torch.randint(0, 50, (2, 3, 7))
    out = torch.ops.pqflex.offload_gather(dev, host, row, pos)
    for b in range(2):
        for h in range(3):
            for t in range(7):
                r, p = int(row[b, h, t]), int(pos[b, h, t])
                assert torch.equal(out[b, h, t], dev[b, h, r] if r >= 0 else host[b, h, p])


@pytest.mark.gpu
def test_cuda_offload_gather_kernel_and_device_view():
    """The Triton kernel reads pinned CPU memory through the device view and equals the reference."""
    from pqflex.kvstore import device_view

    host = torch.randn(2, 4, 1000, 128, dtype=torch.bfloat16).pin_memory()
    view = device_view(host, torch.device("cuda"))
    assert view.is_cuda and view.data_ptr() == host.data_ptr()
    dev = torch.randn(2, 4, 64, 128, dtype=torch.bfloat16, device="cuda")
    row = torch.randint(-1, 64, (2, 4, 300), device="cuda")
    pos = torch.randint(0, 1000, (2, 4, 300), device="cuda")
    got = torch.ops.pqflex.offload_gather(dev, view, row, pos)
    want = portable.offload_gather(dev.cpu(), host, row.cpu(), pos.cpu())
    assert torch.equal(got.cpu(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("kmeans_device", ["auto", "cpu"])
def test_cuda_offload_generate_equals_resident(kmeans_device):
    """Pinned memory, the copy stream, CUDA graphs, CPU k-means on the worker thread: the resident tokens."""
    pq = make("llama").cuda()
    config = SMALL.replace(kmeans_device=kmeans_device)
    pqflex.configure(pq, config)
    ids, mask = padded()
    ids, mask = ids.cuda(), {k: v.cuda() for k, v in mask.items()}
    want = generate(pq, ids, n=40, **mask, **{CACHE_KW: PQStaticCache(pq, 400)})
    cache = PQStaticCache(pq, 400, config.replace(offload=True))
    got = generate(pq, ids, n=40, **mask, **{CACHE_KW: cache})
    assert torch.equal(got, want)
    assert cache.pq_layers[0].store.host_keys.is_pinned()
    check_store_rows(cache.pq_layers[0].store, int(cache.get_seq_length()))


@pytest.mark.gpu
@pytest.mark.parametrize("offload", [False, True])
def test_cuda_chunked_prefill_under_generates_own_compile(offload):
    """On CUDA generate(prefill_chunk_size=...) compiles the chunks (transformers' default CompileConfig: CUDA
    graphs, fullgraph=False): the prompt work runs eagerly between the graphs and the tokens equal an eager run's."""
    pq = make("llama").cuda()
    pqflex.configure(pq, SMALL)
    ids, mask = padded()
    ids, mask = ids.cuda(), {k: v.cuda() for k, v in mask.items()}
    want = generate(pq, ids, n=40, **mask, **{CACHE_KW: PQStaticCache(pq, 400)}, disable_compile=True)
    torch._dynamo.reset()
    got = generate(pq, ids, n=40, **mask, prefill_chunk_size=128,
                   **{CACHE_KW: PQStaticCache(pq, 400, SMALL.replace(offload=offload))})
    assert torch.equal(got, want)


def selection_of(index, selected, n):
    """The Selection of a decode step at ``n - 1`` whose top-k slots are ``selected`` (``[B, Hkv, k_max]``)."""
    return pqflex.Selection(selected, index.spans, None, index.sink_max, min(index.recent_max, index.num_tokens),
                            index.full_lists, index.dense, index.start, n)


def test_hot_unit_enters_only_once_all_its_tokens_are_cached():
    """A 32-token unit that reaches past the newest token stays out (it would go stale); once complete it enters."""
    config = PQConfig(budget=40, sink_size=4, min_context=0, niter=2, offload=True, hot_block=32, hot_ratio=4.0)
    B, Hkv, D, C, N = 1, 1, 8, 256, 90
    key, value = torch.randn(B, Hkv, C, D), torch.randn(B, Hkv, C, D)
    store = OffloadedKV(config, (B, Hkv, C, D), torch.float32, torch.device("cpu"))
    store.write_prompt(key[:, :, :N], value[:, :, :N], 0)
    store.setup(key[:, :, :N], value[:, :, :N])
    index = pqflex.PQIndex.build(key[:, :, :N], config, capacity=C)
    selected = torch.full((B, Hkv, index.k_max), -1, dtype=torch.int32)
    selected[..., 0] = 70  # unit 2: positions 64..95, 90..95 not cached yet
    query = torch.randn(B, 2, 1, D)
    store.attend(query, selection_of(index, selected, N), 1.0)
    assert (store.tags[..., :store.units] != 2).all()
    for m in range(N + 1, 97):  # the unit completes at 96 tokens
        store.write(key[:, :, m - 1:m], value[:, :, m - 1:m], m)
    store.attend(query, selection_of(index, selected, 96), 1.0)
    assert (store.tags[..., :store.units] == 2).any()
    check_store_rows(store, 96)


def test_offload_memory_allocated_up_front_is_used():
    pq = make("llama")
    pqflex.configure(pq, SMALL)
    cache = PQStaticCache(pq, 320, SMALL.replace(offload=True), max_batch_size=1)
    stores = [layer.store for layer in cache.pq_layers]
    assert all(s is not None and s.shape == (1, 2, 384, 8) for s in stores)
    want = generate(pq, prompt(300), n=4, **{CACHE_KW: PQStaticCache(pq, 320)}, disable_compile=True)
    assert torch.equal(generate(pq, prompt(300), n=4, **{CACHE_KW: cache}, disable_compile=True), want)
    assert [layer.store for layer in cache.pq_layers] == stores  # the same memory served the prompt
    with pytest.raises(ValueError, match="max_batch_size must be None or an int >= 1, got 0"):
        PQStaticCache(pq, 320, max_batch_size=0)
