"""sparse_decode_attention (attend the listed tokens by index) against the reference; Triton under the interpreter
on CPU, compiled on CUDA."""

import pytest
import torch

from pqflex.ops import native, portable
from pqflex.ops.sparse_attention import sparse_decode_attention, sparse_decode_attention_triton

from tests.helpers import assert_close_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, Hkv, G, D, C, T, p_valid=0.7, empty_row=True, seed=0, device=DEVICE):
    """fp32 query (a transformers-style view), cache and a list of distinct positions with some invalid slots."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, Hkv * G, D, generator=g).transpose(1, 2)  # [B, H, 1, D], strides (H*D, D, H*D, 1)
    k, v = torch.randn(B, Hkv, C, D, generator=g), torch.randn(B, Hkv, C, D, generator=g)
    idx = torch.rand(B, Hkv, C, generator=g).argsort(-1)[..., :T]  # [B, Hkv, T] distinct positions
    valid = torch.rand(B, Hkv, T, generator=g) < p_valid
    if empty_row:
        valid[-1, 0] = False
    return [t.to(device) for t in (q, k, v, idx, valid)]


def bitmap(idx, valid, C):
    """``[B, Hkv, 1, C]`` bool: the tokens the list attends."""
    hits = torch.zeros(*idx.shape[:2], C, dtype=torch.int32, device=idx.device)
    return (hits.scatter_add_(-1, idx, valid.int()) > 0)[:, :, None]


def check(out, q, k, v, idx, valid, scale, dtype, atol_floor=1e-5):
    """The 2x rule: ``ref32`` from the fp32 inputs, ``ref_lp`` from the inputs rounded to ``dtype``."""
    ref32 = portable.sparse_decode_attention(q, k, v, idx, valid, scale)
    ref_lp = portable.sparse_decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), idx, valid, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close_rule(out, ref_lp, ref32, atol_floor)


@pytest.mark.parametrize("G,T", [(1, 1), (4, 57), (2, 200)])
def test_reference_is_masked_attention_over_the_bitmap(G, T):
    q, k, v, idx, valid = make_inputs(3, 2, G, 16, 250, T, device="cpu")
    want = portable.masked_attention(q, k, v, bitmap(idx, valid, 250), 0.3)
    torch.testing.assert_close(portable.sparse_decode_attention(q, k, v, idx, valid, 0.3), want,
                               atol=1e-5, rtol=1e-5)
    assert (want[-1, :G] == 0).all()  # the row with no valid token
    everything = torch.ones_like(valid)
    torch.testing.assert_close(portable.sparse_decode_attention(q, k, v, idx, None, 0.3),
                               portable.masked_attention(q, k, v, bitmap(idx, everything, 250), 0.3),
                               atol=1e-5, rtol=1e-5)


def test_reference_listing_every_token_is_dense_attention():
    q, k, v, _, _ = make_inputs(2, 2, 4, 16, 90, 90, device="cpu")
    idx = torch.arange(90).flip(0).expand(2, 2, 90)  # any order
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(portable.sparse_decode_attention(q, k, v, idx, None, 0.25), dense,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("G,T,num_splits,block_t,masked", [
    (4, 64, 1, 16, False),  # all valid, one split: the kernel writes the output
    (4, 45, 3, 16, True),  # invalid slots, odd T, partial splits combined
    (1, 37, 2, 32, True),
    (1, 23, None, None, False),  # the default split and block choice
])
def test_triton_matches_reference(G, T, num_splits, block_t, masked):
    q, k, v, idx, valid = make_inputs(2, 2, G, 32, 100, T, seed=T)
    valid = valid if masked else None
    out = sparse_decode_attention_triton(q, k, v, idx, valid, 0.2, num_splits=num_splits, block_t=block_t)
    check(out, q, k, v, idx, valid, 0.2, torch.float32)
    if masked:
        assert (out[-1, :G] == 0).all()


def test_triton_half_int32_idx_and_every_slot_invalid():
    q, k, v, idx, valid = make_inputs(2, 2, 4, 16, 64, 33, seed=1)
    out = sparse_decode_attention_triton(q.half(), k.half(), v.half(), idx.int(), valid, 0.3, num_splits=2,
                                         block_t=16)
    check(out, q, k, v, idx, valid, 0.3, torch.float16)
    none = sparse_decode_attention_triton(q, k, v, idx, torch.zeros_like(valid), 0.3, num_splits=2, block_t=16)
    assert torch.equal(none, torch.zeros_like(none))


def test_registered_op_cpu_is_native_or_the_reference(monkeypatch):
    """The CPU kernel: the native C kernel for fp32 (tests/test_native.py), the reference otherwise."""
    args = make_inputs(2, 2, 4, 16, 100, 30, device="cpu") + [0.25]
    torch.testing.assert_close(torch.ops.pqflex.sparse_decode_attention(*args),
                               portable.sparse_decode_attention(*args), atol=2e-6, rtol=1e-5)
    half = [t.half() if t.is_floating_point() else t for t in args[:5]] + [0.25]
    assert torch.equal(torch.ops.pqflex.sparse_decode_attention(*half), portable.sparse_decode_attention(*half))
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    assert torch.equal(torch.ops.pqflex.sparse_decode_attention(*args), portable.sparse_decode_attention(*args))


def test_op_compiles_on_cpu_without_recompiling():
    q, k, v, idx, valid = make_inputs(1, 2, 4, 16, 100, 30, device="cpu")
    fn = torch.compile(lambda *a: torch.ops.pqflex.sparse_decode_attention(*a, 0.25), backend="aot_eager",
                       fullgraph=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(2):
            idx = torch.rand(1, 2, 100, generator=torch.Generator().manual_seed(seed)).argsort(-1)[..., :30]
            torch.testing.assert_close(fn(q, k, v, idx, valid),
                                       portable.sparse_decode_attention(q, k, v, idx, valid, 0.25))
    torch._dynamo.reset()


@pytest.mark.parametrize("bad,exc,match", [
    (lambda a: a.__setitem__(0, a[0].long()), TypeError, "must share one dtype"),
    (lambda a: a.__setitem__(2, a[2].half()), TypeError, "must share one dtype"),
    (lambda a: a.__setitem__(0, torch.randn(2, 8, 2, 16)), ValueError, "one query per sequence"),
    (lambda a: a.__setitem__(0, torch.randn(2, 7, 1, 16)), ValueError, "H % Hkv == 0"),
    (lambda a: a.__setitem__(2, a[2][:, :, :50]), ValueError, "must have the shape of key"),
    (lambda a: a.__setitem__(3, a[3].float()), TypeError, "idx must be int32 or int64"),
    (lambda a: a.__setitem__(3, a[3][:1]), ValueError, "idx must be \\[B, Hkv, W\\]"),
    (lambda a: a.__setitem__(4, a[4].int()), TypeError, "valid must be bool or None"),
    (lambda a: a.__setitem__(4, a[4][..., 1:]), ValueError, "must have the shape of idx"),
    (lambda a: a.__setitem__(5, float("nan")), ValueError, "scale must be a finite float"),
])
def test_bad_inputs_raise_before_launch(bad, exc, match):
    args = make_inputs(2, 2, 4, 16, 100, 30, device="cpu") + [0.25]
    bad(args)
    with pytest.raises(exc, match=match):
        sparse_decode_attention(*args)


def test_triton_limits():
    q, k, v, idx, valid = make_inputs(1, 1, 17, 16, 40, 8, device="cpu")
    with pytest.raises(ValueError, match="G <= 16"):
        sparse_decode_attention_triton(q, k, v, idx, valid, 0.25)
    with pytest.raises(ValueError, match="num_splits=129 is out of range"):
        sparse_decode_attention_triton(q[:, :4], k, v, idx, valid, 0.25, num_splits=129)
    assert sparse_decode_attention(q, k, v, idx, valid, 0.25).shape == q.shape  # the op falls back


@pytest.mark.parametrize("T,bh,num_splits", [(1, 1, None), (3276, 8, None), (13107, 8, None), (13107, 64, None),
                                             (10 ** 6, 1, None), (3276, 8, 64), (100, 2, 7)])
def test_split_sizes(T, bh, num_splits):
    """Whole blocks per split, at most MAX_SPLITS (or the splits asked for), and every split holds a slot."""
    from pqflex.ops.sparse_attention import MAX_SPLITS, tokens_per_split

    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        if device.type == "cuda" and not torch.cuda.is_available():
            continue
        tokens = tokens_per_split(T, bh, 64, device, num_splits)
        splits = -(-T // tokens)
        assert tokens % 64 == 0 and 1 <= splits <= (num_splits or MAX_SPLITS)
        assert (splits - 1) * tokens < T


GPU_T = [1, 31, 300, 4099, 20000]


@pytest.mark.gpu
@pytest.mark.parametrize("T", GPU_T)
@pytest.mark.parametrize("B,G", [(B, G) for B in (1, 3) for G in (1, 2, 4, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("masked", [True, False])
def test_cuda_grid(T, B, G, dtype, masked):
    q, k, v, idx, valid = make_inputs(B, 2, G, 128, T + 37, T, seed=T + 10 * B + G)
    valid = valid if masked else None
    lp = [t.to(dtype) for t in (q, k, v)]
    out = torch.ops.pqflex.sparse_decode_attention(*lp, idx, valid, 128 ** -0.5)
    check(out, q, k, v, idx, valid, 128 ** -0.5, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 96, 256])
@pytest.mark.parametrize("num_splits", [1, 7, 128])
def test_cuda_head_dims_and_splits(D, num_splits):
    q, k, v, idx, valid = make_inputs(2, 4, 4, D, 3000, 2500, seed=D + num_splits)
    lp = [t.bfloat16() for t in (q, k, v)]
    out = sparse_decode_attention_triton(*lp, idx.int(), valid, D ** -0.5, num_splits=num_splits, block_t=16)
    check(out, q, k, v, idx, valid, D ** -0.5, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_cuda_compiled_op_does_not_recompile_when_the_list_changes(mode):
    """fullgraph compile (and CUDA graphs): new idx/valid values reuse the graph and match the reference."""
    fn = torch.compile(lambda *a: torch.ops.pqflex.sparse_decode_attention(*a, 128 ** -0.5), fullgraph=True,
                       mode=mode)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            q, k, v, idx, valid = make_inputs(2, 8, 4, 128, 5000, 700, seed=seed)
            lp = [t.bfloat16() for t in (q, k, v)]
            check(fn(*lp, idx, valid), q, k, v, idx, valid, 128 ** -0.5, torch.bfloat16)
    torch._dynamo.reset()
