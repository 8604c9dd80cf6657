"""What ``pqflex bench`` prints and writes: the environment line, the table, its notes and the plot."""

from __future__ import annotations

import platform
from typing import Any

import torch

from pqflex.harness.bench_measure import Result


def environment(device: str) -> dict[str, str]:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    if device.startswith("cuda"):
        env["card"] = torch.cuda.get_device_name()
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        env["card"] = f"CPU ({platform.processor() or platform.machine()})"
    return env


def table(results: list[Result]) -> str:
    head = ("| preset | method | tp | batch | context | budget | TTFT s | TPOT ms | floor ms | generate TTFT s "
            "| generate TPOT ms | attn µs/layer | peak GiB | KV GiB on device | hot hits |")
    lines = [head, "|" + "---|" * 15]

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for r in results:
        oom = "OOM" if r.error == "out of memory" else r.error
        times = (f"{oom} | {oom} | " if r.error else f"{r.ttft_s:.3f} | {r.tpot_ms:.2f} | ") + f"{fmt(r.floor_ms, '.2f')} | "
        lines.append(f"| {r.preset} | {r.method} | {r.tp} | {r.batch} | {r.context} | {r.budget} | {times}"
                     f"{fmt(r.gen_ttft_s, '.3f')} | {fmt(r.gen_tpot_ms, '.2f')} | "
                     f"{fmt(r.attn_layer_us, '.1f')} | {fmt(r.peak_gib, '.1f')} | {fmt(r.kv_gib, '.2f')} | "
                     f"{fmt(r.hit_rate, '.1%')} |")
    return "\n".join(lines)


def breakdown_table(results: list[Result]) -> str:
    """Where each profiled row's decode step spent the GPU (``--profile`` on CUDA), per step, in the bench's loop
    and through ``generate()``; empty without one."""
    rows = [(r, step, b, tpot) for r in results
            for step, b, tpot in (("loop", r.breakdown, r.tpot_ms), ("generate()", r.gen_breakdown, r.gen_tpot_ms))
            if b]
    if not rows:
        return ""
    lines = ["| method | batch | context | budget | step | TPOT ms | GEMM ms | PQ kernels ms | other attention ms "
             "| other kernels ms | idle ms | kernels |", "|" + "---|" * 12]
    for r, step, b, tpot in rows:
        lines.append(f"| {r.method} | {r.batch} | {r.context} | {r.budget} | {step} | {tpot:.2f} | "
                     f"{b['gemm_ms']:.2f} | {b['pq_ms']:.2f} | {b.get('attn_ms', 0.0):.2f} | {b['other_ms']:.2f} | "
                     f"{b['idle_ms']:.2f} | {b['kernels']:.0f} |")
    return "\n".join(lines)


def notes(results: list[Result], device: str) -> str:
    """Why a column of the table holds ``-``."""
    lines = []
    if not device.startswith("cuda"):
        lines.append("attn µs/layer and peak GiB: measured on CUDA only (CUDA events, the allocator's peak)")
    elif any(r.attn_layer_us is None for r in results):
        lines.append("attn µs/layer: not timed for pqcache-offload and with --no-layer-attention")
    if any(r.gen_tpot_ms is None and r.method == "flashinfer" for r in results):
        lines.append("generate TTFT/TPOT of flashinfer: not measured (generate() cannot plan FlashInfer before each "
                     "step)")
    if any(r.gen_tpot_ms is None and r.method != "flashinfer" for r in results):
        lines.append("generate TTFT/TPOT: not measured with --no-generate")
    if any(r.kv_gib is None for r in results):
        lines.append("KV GiB on device: the static-cache methods only")
    if any(r.hit_rate is None for r in results):
        lines.append("hot hits: pqcache-offload rows only")
    if any(r.floor_ms is not None for r in results):
        lines.append("floor ms: the bytes a decode step must read (every weight once, the attended keys and values, "
                     "the PQ codes and centroids) at the bandwidth of a plain device copy, copy_GBps below")
    return "\n".join(f"- {line}" for line in lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
    """PNG of TPOT vs context, one line per (method, batch)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from e
    fig, ax = plt.subplots(figsize=(6, 4))
    results = [r for r in results if not r.get("error")]
    for key in sorted({(r["method"], r["batch"]) for r in results}):
        pts = sorted((r["context"], r["tpot_ms"]) for r in results if (r["method"], r["batch"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} (batch {key[1]})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("TPOT (ms)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

