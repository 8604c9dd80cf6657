"""Device memory of key/value state per mode, and what fits on a card (issue #14): dense cache vs GPU-resident
pqcache vs offload, Llama-3.1-8B shape (32 layers, 8 KV heads, head dim 128, bf16), the default PQConfig.

Byte counts do not depend on the device: the script builds one layer's state on the CPU (an
:class:`pqflex.OffloadedKV` set up on a prompt of ``context`` random keys, and the :class:`pqflex.PQIndex` of that
prompt) and reads the sizes of the tensors a GPU would hold; the H200 run of ``pqflex bench`` at 32K reported the
same total (BENCHMARKS.md). From the per-sequence bytes it derives the largest batch at each context and the
longest context at batch 1 that fit a card (weights and a measured activation reserve subtracted) and the host
memory offload needs. Usage::

    python benchmarks/offload_memory.py --context 32768 131072 --card-gib 139.8 79.1 --host-gib 125
"""

from __future__ import annotations

import argparse
import json

import torch

from pqflex import OffloadedKV, PQConfig, PQIndex

LAYERS, HKV, D, BYTES = 32, 8, 128, 2
WEIGHTS_GIB = 8.03e9 * BYTES / 2**30  # Llama-3.1-8B parameters in bf16
GIB = 2**30


def per_sequence(context: int, config: PQConfig) -> dict[str, float]:
    """GiB per sequence on the device: dense KV, resident pqcache (dense KV + PQ state), offload (GPU rows + PQ)."""
    capacity = -(-(context + 1) // 128) * 128
    key = torch.randn(1, HKV, context, D)
    index = PQIndex.build(key, config.replace(niter=1), capacity=capacity)  # sizes only: one Lloyd iteration
    store = OffloadedKV(config.replace(offload=True), (1, HKV, capacity, D), torch.bfloat16, torch.device("cpu"))
    store.setup(key.bfloat16(), key.bfloat16())
    dense = 2 * HKV * capacity * D * BYTES * LAYERS / GIB
    pq = index.nbytes * LAYERS / GIB
    rows = store.device_nbytes * LAYERS / GIB
    return dict(context=context, dense_kv=dense, pq_state=pq, resident=dense + pq, offload=rows + pq,
                offload_rows=rows, host=store.host_nbytes * LAYERS / GIB, ring=store.ring, hot=store.hot,
                sink=store.sink_max)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--card-gib", type=float, nargs="+", default=[139.8, 79.1])
    parser.add_argument("--host-gib", type=float, default=125.0)
    parser.add_argument("--reserve-gib", type=float, default=4.0,
                        help="activations and workspace at batch 1 (H200, 32K: peak 23.0 GiB - weights - KV)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = PQConfig()
    rows = [per_sequence(c, config) for c in args.context]
    print("| context | dense KV GiB | resident pqcache GiB | offload on device GiB | offload / dense | "
          "offload in CPU memory GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['dense_kv']:.2f} | {r['resident']:.2f} | {r['offload']:.3f} | "
              f"{r['offload'] / r['dense_kv']:.1%} | {r['host']:.2f} |")
    print()
    print("| card GiB | context | largest batch: dense | resident pqcache | offload (device) | offload (host) |")
    print("|---|---|---|---|---|---|")
    fits = []
    for card in args.card_gib:
        free = card - WEIGHTS_GIB - args.reserve_gib
        for r in rows:
            f = dict(card=card, context=r["context"], dense=int(free // r["dense_kv"]),
                     resident=int(free // r["resident"]), offload_device=int(free // r["offload"]),
                     offload_host=int(args.host_gib // r["host"]))
            fits.append(f)
            print(f"| {card} | {r['context']} | {f['dense']} | {f['resident']} | {f['offload_device']} | "
                  f"{f['offload_host']} |")
    per_token = {k: rows[-1][k] / rows[-1]["context"] for k in ("dense_kv", "resident", "offload", "host")}
    print()
    for card in args.card_gib:
        free = card - WEIGHTS_GIB - args.reserve_gib
        print(f"card {card} GiB, batch 1, longest context (tokens): dense {free / per_token['dense_kv']:.0f}, "
              f"resident {free / per_token['resident']:.0f}, offload device-bound {free / per_token['offload']:.0f}, "
              f"host-bound {args.host_gib / per_token['host']:.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"weights_gib": WEIGHTS_GIB, "reserve_gib": args.reserve_gib, "host_gib": args.host_gib,
                       "per_sequence": rows, "fits": fits}, f, indent=1)


if __name__ == "__main__":
    main()
