"""KV sources: where a step's keys and values are, and how a step attends them (the second half of plan, then run).

Both take a :class:`pqflex.index.Selection` from :meth:`pqflex.PQIndex.plan` and return the attention output,
``kv.attend(query, selection, scale)``; neither calls back into the index:

- :class:`ResidentKV`: the cache's own tensors on the model's device; the backend object reads the listed rows.
- :class:`OffloadedKV`: every key and value in CPU memory, a few rows on the GPU (below).

OffloadedKV keeps the keys and values of one layer in CPU memory, with the few rows a decode step needs on the GPU.

Every cached token's key and value lives in CPU memory (pinned when the model runs on CUDA) from the moment it is
cached: the prompt goes there by a bulk copy on a side stream during the prefill, each decoded token by a write
through a device view of that memory. The GPU keeps, per sequence and KV head:

- the sink (``sink_max`` rows) and a ring of the ``R`` most recent tokens (row ``p % R`` holds position ``p``),
  which every step attends;
- a hot-token cache of ``hot_ratio * topk`` rows in units of ``hot_block`` tokens: direct-mapped (unit ``u`` may
  live in slot ``u % units``) with frequency replacement: every selection counts its units, and a unit that
  missed replaces the slot's resident when it has been selected more often (ties keep the resident). A
  single-token unit is admitted from the rows the step already read; a larger unit is read whole from CPU memory,
  once all of its tokens are cached;
- the PQ codes and centroids (in :class:`pqflex.PQIndex`, not here).

A decode step (:meth:`OffloadedKV.attend`) maps each listed position to a GPU row (sink, ring, hot hit) or to
CPU memory (a miss), reads each row from exactly one place (:func:`torch.ops.pqflex.offload_gather`) and attends
them with the configured backend. It selects and attends exactly what the GPU-resident cache does; only where the
rows come from differs. Static shapes and no host sync, so the step compiles and replays as a CUDA graph (the
device view of pinned memory is an ordinary CUDA tensor to the compiler).

On a CPU-only machine the "host" and "device" tensors are both CPU tensors: the same code runs, which is what the
CPU tests check.
"""

from __future__ import annotations

import warnings

import torch

from pqflex.config import PQConfig
from pqflex.index import Selection, sequence_budgets
from pqflex.ops import offload  # noqa: F401  (registers torch.ops.pqflex.offload_gather)
from pqflex.ops.backends import attention_backend, masked_attention, range_attention


class ResidentKV:
    """The keys and values ``[B, Hkv, C, D]`` a cache holds on the model's device (``C`` cached tokens, or a
    fixed-capacity buffer with the first ``n`` rows filled), attended by the layer's backend object
    (:func:`pqflex.ops.backends.attention_backend`, chosen when the layer was built)."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor, backend) -> None:
        self.key, self.value, self.backend = key, value, backend

    def attend(self, query: torch.Tensor, selection: Selection, scale: float) -> torch.Tensor:
        """Exact attention ``[B, H, S, D]`` of ``query`` ``[B, H, S, D]`` over the tokens ``selection`` lists."""
        if selection.mask is not None:  # several queries, a token mask each
            N = selection.mask.shape[-1]
            return masked_attention(query, self.key[:, :, :N], self.value[:, :, :N], selection.mask, scale)
        if selection.dense and not self.backend.reads_spans(query, self.key):  # no list of all: SDPA over the range
            return range_attention(query, self.key, self.value, selection.start, selection.n, scale)
        return self.backend(query, self.key, self.value, selection, scale)


class _CudaArray:
    """A ``__cuda_array_interface__`` over pinned host memory (under unified addressing the host pointer is a
    device pointer); holds the host tensor so the memory outlives every view."""

    def __init__(self, host: torch.Tensor, owner: object = None) -> None:
        self.host, self.owner = host, owner
        size = host.element_size()
        self.__cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": f"<i{size}",
                                         "data": (host.data_ptr(), False), "version": 3,
                                         "strides": tuple(s * size for s in host.stride())}


class HostBuffer:
    """CPU memory for an offloaded store: pageable memory registered with CUDA (page-locked and mapped).

    Registering fresh pageable memory is several times faster than a pinned allocation
    (``torch.empty(..., pin_memory=True)``; BENCHMARKS.md), and a cache is mostly this memory. Unregistered when the last view of it is gone (after a device sync). On the CPU, plain
    memory.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.tensor = torch.empty(shape, dtype=dtype)
        self.device = device
        self.registered = False
        if device.type == "cuda" and self.tensor.numel():
            nbytes = self.tensor.numel() * self.tensor.element_size()
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0))
            self.registered = True

    def __del__(self) -> None:
        if getattr(self, "registered", False):
            try:
                torch.cuda.synchronize(self.device)  # no kernel may still read it
                torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            except Exception:  # interpreter shutdown: the process is going anyway
                pass


def device_view(host: torch.Tensor, device: torch.device, owner: object = None) -> torch.Tensor:
    """A tensor on ``device`` over the memory of the CPU tensor ``host`` (no copy): kernels read and write host
    memory through it over PCIe. ``host`` itself where ``device`` is the CPU; it must be pinned (or registered)
    for CUDA. ``owner`` (e.g. a :class:`HostBuffer`) is kept alive as long as the view."""
    if device.type == "cpu":
        return host
    if device.type != "cuda":
        raise NotImplementedError(f"offload supports CUDA and CPU devices, got {device}")
    if not host.is_pinned() or not host.is_contiguous():
        raise ValueError("device_view needs a contiguous pinned CPU tensor")
    view = torch.as_tensor(_CudaArray(host, owner), device=device)  # integers of the element size (no bf16 typestr)
    return view.view(host.dtype)


class OffloadedKV:
    """Keys and values ``[B, Hkv, capacity, D]`` of one layer in CPU memory, sink + recent + hot rows on the GPU.

    Args:
        config: the PQ settings (budgets, ``hot_ratio``, ``hot_block``, ``backend``).
        shape: ``(B, Hkv, capacity, D)``.
        dtype, device: of the keys and values the model computes (``device`` is where attention runs).
        stream: CUDA stream of the prompt's bulk copies (default: a new one).

    Attributes:
        keys, values: the whole cache as ``device`` tensors over CPU memory (:func:`device_view`).
        host_keys, host_values: the same memory as CPU tensors.
        hits, lookups: 0-d device counters of hot-cache hits and selected tokens looked up (no sync to count).
    """

    def __init__(self, config: PQConfig, shape: tuple[int, int, int, int], dtype: torch.dtype,
                 device: torch.device, stream: torch.cuda.Stream | None = None) -> None:
        B, Hkv, C, D = shape
        self.config, self.shape, self.device = config, tuple(shape), torch.device(device)
        pin = self.device.type == "cuda"
        if not pin:
            warnings.warn(f"pqflex: PQConfig(offload=True) on {self.device} only simulates offloading (the keys and "
                          "values are in CPU memory already) and decodes several times slower than the resident "
                          "cache: use offload=False without a GPU", RuntimeWarning, stacklevel=2)
        self.dtype = dtype
        self.backend = attention_backend(config)
        self.buffer = HostBuffer((2, B, Hkv, C, D), dtype, self.device)
        self.host_keys, self.host_values = self.buffer.tensor.unbind(0)
        self.keys = device_view(self.host_keys, self.device, self.buffer)
        self.values = device_view(self.host_values, self.device, self.buffer)
        self.stream = stream if stream is not None or not pin else torch.cuda.Stream(self.device)
        self.filled = 0  # prompt tokens stored by write_prompt
        self.rows_k: torch.Tensor | None = None  # [B, Hkv, sink_max + R + hot + 1, D]: sink | ring | hot | trash
        self.rows_v: torch.Tensor | None = None
        self.hits = torch.zeros((), dtype=torch.long, device=self.device)
        self.lookups = torch.zeros((), dtype=torch.long, device=self.device)

    def __repr__(self) -> str:
        B, Hkv, C, D = self.shape
        gpu = "not set up" if self.rows_k is None else f"sink {self.sink_max} + ring {self.ring} + hot {self.hot}"
        return f"OffloadedKV(B={B}, Hkv={Hkv}, capacity={C}, D={D}, GPU rows: {gpu})"

    # -- writes -------------------------------------------------------------------------------------------------

    def write_prompt(self, key: torch.Tensor, value: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store prompt rows ``[B, Hkv, S, D]`` at positions ``first ..``; return the prompt so far (on the device).

        On CUDA the copy to pinned memory runs on the side stream, after what the current stream queued so far.
        Eager (the prefill).
        """
        S = key.shape[-2]
        self._check_rows(key, value, first + S)
        if first != self.filled and first != 0:
            raise ValueError(f"prompt rows must follow the {self.filled} stored, got a chunk at position {first}")
        self.filled = first + S
        if self.stream is None:
            self.host_keys[:, :, first:first + S].copy_(key)
            self.host_values[:, :, first:first + S].copy_(value)
        else:
            # One contiguous DMA per sequence and head: a strided CPU destination would make torch copy through
            # a pageable temporary, synchronously.
            key, value = key.contiguous(), value.contiguous()
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for host, x in ((self.host_keys, key), (self.host_values, value)):
                    for b in range(x.shape[0]):
                        for h in range(x.shape[1]):
                            host[b, h, first:first + S].copy_(x[b, h], non_blocking=True)
            key.record_stream(self.stream)
            value.record_stream(self.stream)
        if first == 0:
            return key, value
        self.sync()  # a later prompt chunk attends the earlier ones, read back from CPU memory
        return (torch.cat([self.keys[:, :, :first], key], dim=-2),
                torch.cat([self.values[:, :, :first], value], dim=-2))

    def sync(self) -> None:
        """Make the current stream wait for the prompt copies queued so far (no host sync)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def write(self, key: torch.Tensor, value: torch.Tensor, n: torch.Tensor | int) -> None:
        """Store the newest token ``[B, Hkv, 1, D]`` at position ``n - 1`` (``n`` may be a 0-d device tensor): in
        CPU memory, the ring and, within the sink, the sink rows. No host sync."""
        if self.rows_k is None:
            raise RuntimeError("OffloadedKV.write before setup(): prefill the prompt first")
        if key.shape[-2] != 1:
            raise ValueError(f"OffloadedKV.write stores one token per sequence, got {key.shape[-2]}")
        p = (n if torch.is_tensor(n) else torch.tensor(n, device=self.device)).reshape(1) - 1
        self.keys.index_copy_(2, p, key)
        self.values.index_copy_(2, p, value)
        B, Hkv, _, D = key.shape
        into_sink = p - self.start  # [B]
        sink_row = torch.where((into_sink >= 0) & (into_sink < self.sink_max), into_sink, self.trash)
        ring_row = self.sink_max + p % self.ring  # [1]
        rows = torch.stack([sink_row, ring_row.expand(B)], dim=-1)[:, None, :, None].expand(B, Hkv, 2, D)
        self.rows_k.scatter_(2, rows, torch.cat([key, key], dim=2))
        self.rows_v.scatter_(2, rows, torch.cat([value, value], dim=2))

    # -- the GPU rows -------------------------------------------------------------------------------------------

    def setup(self, key: torch.Tensor, value: torch.Tensor, kv_mask: torch.Tensor | None = None) -> None:
        """Lay out the GPU rows for the complete prompt ``key``/``value`` ``[B, Hkv, N, D]`` (on the device).

        The budgets come from :func:`pqflex.index.sequence_budgets`, as the index's do: the sink and recent widths
        of a step's token list are the widths kept here. Contexts attended densely (short ones) keep every token
        in the ring.
        """
        B, Hkv, C, D = self.shape
        N = key.shape[-2]
        self._check_rows(key, value, N)
        cfg = self.config
        self.start, _, budgets = sequence_budgets(cfg, kv_mask, B, N, self.device)
        self.sink_max = max(b.sink_size for b in budgets)
        self.ring = min(max(b.recent_size for b in budgets), C)
        k_max = max(b.topk for b in budgets)
        g = cfg.hot_block
        self.units = int(cfg.hot_ratio * k_max) // g  # hot-cache slots, each one unit of g tokens
        self.hot = self.units * g
        self.base = self.sink_max + self.ring  # first hot row
        self.trash = self.base + self.hot  # written by masked-off updates, read by empty slots
        rows = self.trash + 1
        self.rows_k = key.new_zeros(B, Hkv, rows, D)
        self.rows_v = value.new_zeros(B, Hkv, rows, D)
        # The sink: position start + j in row j; the ring: position p in row sink_max + p % ring.
        sink_pos = (self.start[:, None] + torch.arange(self.sink_max, device=self.device)).clamp(max=N - 1)
        ring_pos = torch.arange(max(N - self.ring, 0), N, device=self.device)
        dst = torch.cat([torch.arange(self.sink_max, device=self.device).expand(B, -1),
                         (self.sink_max + ring_pos % self.ring).expand(B, -1)], dim=-1)  # [B, rows used]
        src = torch.cat([sink_pos, ring_pos.expand(B, -1)], dim=-1)
        for rows_t, x in ((self.rows_k, key), (self.rows_v, value)):
            picked = x.gather(2, src[:, None, :, None].expand(B, Hkv, src.shape[-1], D))
            rows_t.scatter_(2, dst[:, None, :, None].expand(B, Hkv, dst.shape[-1], D), picked)
        self.tags = torch.full((B, Hkv, self.units + 1), -1, dtype=torch.int32, device=self.device)
        self.freq = torch.zeros(B, Hkv, -(-C // g) + 1, dtype=torch.int32, device=self.device)
        self.hits.zero_()
        self.lookups.zero_()

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """What a decode step reads or writes (for ``torch._dynamo.mark_static_address``)."""
        return (self.keys, self.values, self.rows_k, self.rows_v, self.tags, self.freq, self.start, self.hits,
                self.lookups)

    @property
    def device_nbytes(self) -> int:
        """Bytes this store holds on the device (sink, ring, hot rows, cache tags and counts)."""
        if self.rows_k is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.rows_k, self.rows_v, self.tags, self.freq))

    @property
    def host_nbytes(self) -> int:
        return 2 * self.host_keys.numel() * self.host_keys.element_size()

    @property
    def hit_rate(self) -> float:
        """Hot-cache hits per selected token looked up since the prompt (syncs)."""
        lookups = int(self.lookups)
        return float(self.hits) / lookups if lookups else float("nan")

    # -- a decode step ------------------------------------------------------------------------------------------

    def attend(self, query: torch.Tensor, selection: Selection, scale: float) -> torch.Tensor:
        """Attention ``[B, H, 1, D]`` of one query per sequence over the tokens of ``selection`` (a decode step's
        token list, :meth:`pqflex.PQIndex.plan`): each row read from exactly one place (sink, ring, hot hit, or
        CPU memory for a miss). Then the hot cache counts this selection and admits what missed. No host sync."""
        if self.rows_k is None:
            raise RuntimeError("OffloadedKV.attend before setup(): prefill the prompt first")
        if selection.middle is None:
            raise ValueError("an offloaded cache attends one query per sequence (a token list), got a token mask")
        idx, valid = selection.token_list()
        n = selection.n
        B, Hkv, T = idx.shape
        S0, W, g = selection.sink, selection.middle.shape[-1], self.config.hot_block
        if S0 != self.sink_max or selection.recent != self.ring:
            raise ValueError(f"the token list's widths (sink {S0}, recent {selection.recent}) are not this store's "
                             f"(sink {self.sink_max}, ring {self.ring})")
        sel, sel_ok = idx[:, :, S0:S0 + W], valid[:, :, S0:S0 + W]
        if self.units:
            unit = sel // g
            slot = unit % self.units
            hit = sel_ok & (self.tags.gather(-1, slot) == unit)
            sel_rows = torch.where(hit, self.base + slot * g + sel % g, -1)
        else:
            hit = torch.zeros_like(sel_ok)
            sel_rows = torch.full_like(sel, -1)
        sel_rows = torch.where(sel_ok, sel_rows, self.trash)  # an empty slot reads a GPU row, never CPU memory
        sink_rows = torch.arange(S0, device=idx.device).expand(B, Hkv, S0)
        ring_rows = S0 + idx[:, :, S0 + W:] % self.ring
        rows = torch.cat([sink_rows, sel_rows, ring_rows], dim=-1)
        k = torch.ops.pqflex.offload_gather(self.rows_k, self.keys, rows, idx)
        v = torch.ops.pqflex.offload_gather(self.rows_v, self.values, rows, idx)
        slots = torch.arange(T, device=idx.device).expand(B, Hkv, T)
        listed = Selection(slots if selection.full else torch.where(valid, slots, -1), None, None, 0, 0,
                           selection.full, False, selection.start, n)
        out = self.backend(query, k, v, listed, scale)
        self.lookups.add_(sel_ok.sum())
        self.hits.add_(hit.sum())
        if self.units:
            self._admit(sel, sel_ok, hit, k[:, :, S0:S0 + W], v[:, :, S0:S0 + W], n)
        return out

    def _admit(self, sel: torch.Tensor, sel_ok: torch.Tensor, hit: torch.Tensor, k_sel: torch.Tensor,
               v_sel: torch.Tensor, n: torch.Tensor | int) -> None:
        """Count the selected units; each missed unit takes its slot when selected more often than the resident."""
        B, Hkv, W = sel.shape
        D, g, units = k_sel.shape[-1], self.config.hot_block, self.units
        unit = sel // g
        self.freq.scatter_add_(-1, unit, sel_ok.int())
        slot = unit % units
        wanted = (self.freq.gather(-1, unit).long() << 32) | unit  # frequency first, then the later unit
        miss = sel_ok & ~hit & ((unit + 1) * g <= n)  # a unit comes in only once all its tokens are cached
        resident = self.tags[:, :, :units].long()
        held = torch.where(resident >= 0,
                           (self.freq.gather(-1, resident.clamp(min=0)).long() << 32) | 0xFFFFFFFF, -1)
        best = held.scatter_reduce(-1, slot, torch.where(miss, wanted, -1), "amax")
        win = miss & (best.gather(-1, slot) == wanted)  # [B, Hkv, W]
        old = self.tags[:, :, :units].clone() if g > 1 else None
        self.tags.scatter_(-1, torch.where(win, slot, units), unit.int())
        if g == 1:  # the winners' rows are the ones this step just read
            dst = torch.where(win, self.base + slot, self.trash)[..., None].expand(B, Hkv, W, D)
            self.rows_k.scatter_(2, dst, k_sel)
            self.rows_v.scatter_(2, dst, v_sel)
            return
        changed = (self.tags[:, :, :units] != old).repeat_interleave(g, dim=-1)  # [B, Hkv, hot]
        pos = (self.tags[:, :, :units].long()[..., None] * g + torch.arange(g, device=sel.device)).flatten(-2)
        pos = pos.clamp(0, self.shape[2] - 1)
        src = torch.where(changed, -1, self.trash)
        dst = torch.where(changed, self.base + torch.arange(self.hot, device=sel.device), self.trash)
        dst = dst[..., None].expand(B, Hkv, self.hot, D)
        self.rows_k.scatter_(2, dst, torch.ops.pqflex.offload_gather(self.rows_k, self.keys, src, pos))
        self.rows_v.scatter_(2, dst, torch.ops.pqflex.offload_gather(self.rows_v, self.values, src, pos))

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def crop(self, n: int) -> None:
        """Forget positions ``>= n``: hot units holding any are dropped, the ring is refilled from CPU memory."""
        if self.rows_k is None:
            return
        self.sync()
        g = self.config.hot_block
        self.tags.masked_fill_((self.tags + 1) * g > n, -1)
        ring_pos = torch.arange(max(n - self.ring, 0), n, device=self.device)
        B, Hkv, _, D = self.rows_k.shape
        dst = (self.sink_max + ring_pos % self.ring)[None, None, :, None].expand(B, Hkv, -1, D)
        for rows_t, x in ((self.rows_k, self.keys), (self.rows_v, self.values)):
            rows_t.scatter_(2, dst, x.index_select(2, ring_pos))

    def _check_rows(self, key: torch.Tensor, value: torch.Tensor, end: int) -> None:
        B, Hkv, C, D = self.shape
        if key.shape != value.shape or key.dim() != 4 or key.shape[:2] != (B, Hkv) or key.shape[3] != D:
            raise ValueError(f"keys and values must be [B, Hkv, S, D] with B, Hkv, D = {(B, Hkv, D)}, got "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        if end > C:
            raise ValueError(f"{end} tokens do not fit this offloaded cache of {C} per sequence")
