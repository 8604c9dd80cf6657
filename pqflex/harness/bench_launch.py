"""``pqflex bench --tp N``: the launcher (``torch.distributed.run`` over ``N`` local processes), the stub checkpoint each
rank loads its shard from, and the helpers the ranks agree through."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Iterator

import torch

from pqflex.harness.bench_measure import _distributed, model_config, prompt_ids


def check_tp(preset: str, tp: int) -> None:
    """Raise ``ValueError`` unless ``tp`` ranks split the preset's attention and KV heads into whole heads."""
    cfg = model_config(preset)
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    allowed = [d for d in range(1, math.gcd(H, Hkv) + 1) if H % d == 0 and Hkv % d == 0]
    if tp not in allowed:
        raise ValueError(f"--tp {tp} does not divide the {H} attention and {Hkv} KV heads of {preset}; "
                         f"allowed: {allowed}")


def write_stub_checkpoint(preset: str, path: str) -> None:
    """A checkpoint directory of the preset's shape holding one small tensor (the final norm's weight):
    ``from_pretrained`` initializes every missing weight randomly, under TP each rank only its own shard."""
    from safetensors.torch import save_file

    cfg = model_config(preset)
    cfg.save_pretrained(path)
    save_file({"model.norm.weight": torch.ones(cfg.hidden_size)}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


def load_sharded(path: str, attn: str, dtype: torch.dtype):
    """The stub checkpoint at ``path`` loaded with ``tp_plan="auto"`` (this rank's shard, on its device)."""
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report lists every weight as missing: the stub's whole point
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings():
            # transformers >= 5.17 prefers distributed_config=DistributedConfig(...); tp_plan is what users write.
            warnings.filterwarnings("ignore", message=".*tp_plan.*", category=FutureWarning)
            model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", attn_implementation=attn, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()


@contextlib.contextmanager
def stub_checkpoint(preset: str) -> Iterator[str]:
    """Rank 0 writes the preset's stub checkpoint in a temporary directory, the other ranks get its path (one
    host: the ranks of ``torchrun --standalone``); removed when the block ends."""
    import torch.distributed as dist

    path = [tempfile.mkdtemp(prefix="pqflex-bench-") if dist.get_rank() == 0 else None]
    try:
        if dist.get_rank() == 0:
            write_stub_checkpoint(preset, path[0])
        dist.broadcast_object_list(path, src=0)
        yield path[0]
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(path[0], ignore_errors=True)


def launch(argv: list[str], tp: int) -> int:
    """Run ``pqflex <argv>`` on ``tp`` local processes with torch's launcher; its exit code.

    The launcher would give each rank one CPU thread (``OMP_NUM_THREADS=1``); the ranks get an equal share of the
    cores instead (CPU k-means, weight initialization), unless ``OMP_NUM_THREADS`` is set already.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp),
               "-m", "pqflex.harness.cli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(rank_threads(tp)))
    print(f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} " + " ".join(command), flush=True)
    return subprocess.run(command, env=env).returncode


def rank_threads(ranks: int) -> int:
    """CPU threads per rank when ``ranks`` processes share this machine's cores (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // ranks)


@contextlib.contextmanager
def process_group(device: str) -> Iterator[str]:
    """This rank's process group (nccl on CUDA, gloo on the CPU) for the block; yields this rank's device."""
    import torch.distributed as dist

    if device.startswith("cuda"):
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    try:
        yield device
    finally:
        # On two H200s a rank once hung after its last row (nccl, CUDA graphs): every rank drains its stream, and
        # the compiled graphs (which captured the communicator's kernels) go, before the group is destroyed.
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        torch._dynamo.reset()
        gc.collect()
        dist.destroy_process_group()


def check_same_prompt(vocab: int, device: str) -> None:
    """Raise ``RuntimeError`` unless every rank draws the same prompt from the seeded generator (every rank must
    call it). Checked once before the sweep rather than broadcast in each run: a collective inside a run would pair
    with another rank's failure flag when one rank runs out of memory before it."""
    ids = prompt_ids(vocab, 1, 256, device, seed=0).tolist()
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, ids)
    if any(other != ids for other in every):
        raise RuntimeError("the ranks' seeded generators drew different prompts; TP needs the same prompt on each")


def any_rank(flag: bool, device: str) -> bool:
    """Whether ``flag`` holds on any rank (every rank must call it)."""
    if not _distributed():
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())

