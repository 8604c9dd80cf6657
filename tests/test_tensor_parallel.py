"""Tensor parallelism through transformers (``tp_plan="auto"``): each rank runs pqcache over its own KV heads.

Two processes on the CPU with the gloo backend (transformers maps the CPU to gloo), and on two GPUs with nccl (marked
``gpu``): a random-weight Llama saved to a directory, loaded with ``tp_plan="auto"`` on each rank; greedy generation
must equal the single-process run, with the adopted ``DynamicCache``, with a ``PQStaticCache`` and with an offloaded
one (each rank's CPU memory sized for its own KV heads), and a budget covering the context must equal SDPA.
"""

import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig

import pqflex
from pqflex import PQStaticCache

from tests.test_transformers import CACHE_KW, SPARSE, TINY, generate, prompt

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runs(model, ids) -> dict[str, torch.Tensor]:
    pqflex.configure(model, SPARSE)
    out = {"dynamic": generate(model, ids),
           "static": generate(model, ids, **{CACHE_KW: PQStaticCache(model, 320)}, disable_compile=True),
           "offload": generate(model, ids, **{CACHE_KW: PQStaticCache(model, 320, SPARSE.replace(offload=True),
                                                                      max_batch_size=1)}, disable_compile=True)}
    pqflex.configure(model, SPARSE.replace(budget=1.0))
    out["dense"] = generate(model, ids)
    return out


def _compiled_decode(model, ids, n: int = 12, graphed: bool = False) -> torch.Tensor:
    """Greedy tokens with an eager prefill and a decode step compiled with ``fullgraph=True`` (what generate()
    compiles on CUDA); ``graphed``: through a :class:`pqflex.DecodeGraph` (on CUDA, replayed from a CUDA graph from
    the third step on)."""
    pqflex.configure(model, SPARSE)
    cache = PQStaticCache(model, 320)
    if graphed:
        step = pqflex.DecodeGraph(model, cache)
    else:
        compiled = torch.compile(model.forward, fullgraph=True, dynamic=False)

        def step(token):
            return compiled(token, **{CACHE_KW: cache}, logits_to_keep=1).logits
    with torch.no_grad():
        tokens = [model(ids, **{CACHE_KW: cache}, logits_to_keep=1).logits[:, -1:].argmax(-1)]
        for _ in range(n - 1):
            tokens.append(step(tokens[-1])[:, -1:].argmax(-1))
    return torch.cat(tokens, 1)


def _rank(rank: int, port: int, path: str, queue, backend: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    device = "cpu" if backend == "gloo" else f"cuda:{rank}"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=WORLD)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="pqcache", tp_plan="auto",
                                                     dtype=torch.float32).eval()
        attn = model.model.layers[0].self_attn
        local_kv = attn.k_proj.weight.to_local().shape[0] // attn.head_dim
        ids = prompt(300).to(device)
        runs = {k: v.tolist() for k, v in _runs(model, ids).items()}  # no shared tensors: the rank exits
        with pqflex.tp_inference(model):  # the sharded Linear weights as plain local tensors
            local_type = type(attn.k_proj.weight).__name__
            runs.update({f"local {k}": v.tolist() for k, v in _runs(model, ids).items()})
            runs["local compiled"] = _compiled_decode(model, ids).tolist()
            runs["local graphed"] = _compiled_decode(model, ids, graphed=True).tolist()
            try:
                model(ids[:, :8])  # grad enabled: refused
                grad_error = ""
            except RuntimeError as e:
                grad_error = str(e)
        result = {"tp_size": model.tp_size, "local_kv_heads": local_kv, "local_type": local_type,
                  "grad_error": grad_error, "restored_type": type(attn.k_proj.weight).__name__, **runs}
    except Exception:  # noqa: BLE001  (the parent reports it)
        result = {"error": traceback.format_exc()}
    queue.put((rank, result))
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", [
    "gloo",
    pytest.param("nccl", marks=[pytest.mark.gpu, pytest.mark.skipif(
        torch.cuda.device_count() < WORLD, reason=f"nccl needs {WORLD} CUDA devices")]),
])
def test_two_rank_tensor_parallel_generation_equals_one_process(tmp_path, backend):
    device = "cpu" if backend == "gloo" else "cuda:0"  # nccl: rank r on cuda:r, the one-process run on cuda:0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**TINY)).save_pretrained(tmp_path)
    single = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="pqcache",
                                                  dtype=torch.float32).to(device).eval()
    ids = prompt(300).to(device)
    want = _runs(single, ids)
    sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa",
                                                dtype=torch.float32).to(device).eval()
    assert torch.equal(want["dense"], generate(sdpa, ids))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(tmp_path), queue, backend)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, got in results.items():
        assert "error" not in got, got.get("error")
        assert got["tp_size"] == WORLD and got["local_kv_heads"] == TINY["num_key_value_heads"] // WORLD
        for run in ("dynamic", "static", "offload", "dense"):
            assert got[run] == want[run].tolist(), (rank, run)
            assert got[f"local {run}"] == want[run].tolist(), (rank, run)
        assert got["local compiled"] == want["static"].tolist(), rank
        assert got["local graphed"] == want["static"].tolist(), rank
        assert (got["local_type"], got["restored_type"]) == ("Parameter", "DTensor")
        assert "inside pqflex.tp_inference(), which serves inference only" in got["grad_error"]
    assert torch.equal(want["offload"], want["static"])  # offload selects and attends what the resident cache does


def test_tensor_parallel_degree_must_divide_the_kv_heads():
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY, "num_key_value_heads": 1}))
    model._tp_size = 2  # what transformers records for tp_plan="auto" over 2 ranks
    with pytest.raises(NotImplementedError, match="tp_size=2 ranks splits the 1 KV head\\(s\\).*use tp_size in \\[1\\]"):
        pqflex.configure(model, SPARSE)
    with pytest.raises(NotImplementedError, match="tp_size=2"):
        pqflex.PQCache(model, SPARSE)


def test_tp_inference_passes_a_model_without_tensor_parallelism_through():
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY)).eval()
    weights = [p for p in model.parameters()]
    with pqflex.tp_inference(model) as same:
        assert same is model and all(a is b for a, b in zip(model.parameters(), weights))
        model(prompt(8))  # grad enabled is fine: nothing was swapped
    assert all(a is b for a, b in zip(model.parameters(), weights))
