"""The Triton spatial-attention kernels (triton_kernels/attention.py): what only they have.

Their parity tables (backends "triton" and "triton-v2", the variant triton_attention_v2) and the op cases
every backend shares (NaN, -inf keys, huge logits, empty lengths, determinism) are in
tests/test_attention_op_cases.py, through the tester of tests/_op_cases.py. Here: grid folding, the
autotune pruner, the variant's launch plan and aligned inputs, and the GPU-only long and wide launches.
Without a GPU the launchers run in Triton's interpreter on CPU tensors (tiny shapes).
"""
import importlib
import itertools
import os

import pytest
import torch

pytest.importorskip("triton")

from _op_cases import ATTENTION_BACKENDS, INTERPRETED, backend_ops, make, run_attention_case  # noqa: E402


def _load_triton_attention():
    """The Triton launchers, installed as fastattn.triton_kernels.attention."""
    return importlib.import_module("fastattn.triton_kernels.attention")


attention = _load_triton_attention()
INTERPRET = INTERPRETED
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)
TRITON = ATTENTION_BACKENDS["triton"]


@pytest.fixture
def kernels(request, monkeypatch):
    """Run the launchers with (v2) or without (v1) variant triton_attention_v2 switched on."""
    variant = request.node.callspec.params.get("variant", "v1")
    backend_ops(ATTENTION_BACKENDS["triton-v2" if variant == "v2" else "triton"], monkeypatch)
    return variant


@pytest.mark.skipif(not INTERPRET, reason="bfloat16 runs on the GPU; this documents why the interpreter skips it")
def test_bfloat16_in_interpreter_is_skipped():
    pytest.skip("Triton's interpreter multiplies bfloat16 bit patterns as integers in tl.dot; bfloat16 runs on GPU")


def test_batch_heads_fold_onto_grid_axis_2(monkeypatch):
    """batch*heads past the grid-axis limit folds onto axis 2 (limit shrunk to 2 so it runs in the interpreter)."""
    ops = backend_ops(TRITON, monkeypatch)
    monkeypatch.setattr(attention, "_MAX_GRID_YZ", 2)
    # 5 batch*heads on a 2 x 3 grid: one program has nothing to do
    run_attention_case(TRITON, ops, (5, 1, 8, 8, 7, 5, None), torch.float32, "contiguous")


def test_every_head_dim_and_length_keeps_a_config():
    """The autotune pruner leaves at least one config within the tile limits for every dtype, d <= 512, length."""
    import triton

    for kernel, candidates in attention._CANDIDATES.items():
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in candidates]
        prune = attention._config_pruner(kernel)
        resident_name = attention._RESIDENT_BLOCK[kernel]
        streamed_name = "BLOCK_M" if resident_name == "BLOCK_N" else "BLOCK_N"
        for dtype, d, length in itertools.product(
                (torch.float32, torch.float16), (8, 40, 64, 80, 96, 128, 160, 256, 320, 512), (1, 49, 196, 4097, 70000)):
            q = torch.empty(0, dtype=dtype)
            block_d = attention._block_d(d)
            kept = prune(configs, {"q_ptr": q}, BLOCK_DQK=block_d, BLOCK_DV=16,
                         LENGTH_BUCKET=attention._length_bucket(length))
            max_resident, max_streamed = attention._tile_limits_v2(kernel, block_d, q.element_size())
            assert kept, (kernel, dtype, d, length)
            for c in kept:
                assert c.kwargs[resident_name] <= max_resident and c.kwargs[streamed_name] <= max_streamed, (
                    kernel, dtype, d, length, c)


@pytest.mark.skipif(INTERPRET, reason="65 537 positions are too slow for the interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("len_q,len_k", [(65537, 48), (48, 65537)])
def test_long_sequence_gpu(len_q, len_k, dtype, monkeypatch):
    """L >= 65 536 on one side (64-bit offsets, query blocks on grid axis 0); the other side short so
    the float64 reference (Lq x Lk logits) stays small."""
    run_attention_case(TRITON, backend_ops(TRITON, monkeypatch), (1, 2, 64, 64, len_q, len_k, None), dtype,
                       "channel_last")


@pytest.mark.skipif(INTERPRET, reason="65 536 programs are too slow for the interpreter")
def test_batch_heads_past_grid_limit_gpu(monkeypatch):
    # 66 000 batch*heads > 65 535
    run_attention_case(TRITON, backend_ops(TRITON, monkeypatch), (33000, 2, 16, 16, 3, 5, None), torch.float16,
                       "contiguous")


@pytest.mark.parametrize("dtype,variant,expect_v2", [(torch.float16, "v2", True), (torch.float32, "v2", False),
                                                     (torch.float16, "v1", False)])
def test_variant_switch_picks_the_kernels(dtype, variant, expect_v2, kernels):
    """The launchers take the v2 kernels only with triton_attention_v2 on, and only for 16-bit inputs."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (make(1, 80, 49, dtype, "contiguous", gen, TRITON.device) for _ in range(3))
    heads, scale = 2, 40 ** -0.5
    out, lse = torch.empty_like(q), torch.empty(1, heads, 49, device=q.device)
    plan = attention._forward_launches(q, k, v, out, lse, heads, 40, 40, scale, attention._v2(dtype))
    assert (plan[0][0] is attention._spatial_attention_fwd_kernel_v2) == expect_v2
    assert (plan[0][0] is attention._spatial_attention_fwd_kernel) != expect_v2


@pytest.mark.parametrize("layout,length,copied", [("contiguous", 32, False), ("contiguous", 49, True),
                                                  ("channel_last", 49, False), ("strided", 48, True)])
def test_v2_inputs_are_16_byte_aligned(layout, length, copied):
    """_vector_aligned: the input itself where its strides allow 16-byte tile loads, else an equal copy
    whose pitch is a multiple of 16 and whose NCHW padding is zero (tiles read up to L rounded to 16)."""
    gen = torch.Generator().manual_seed(0)
    if layout == "strided":  # a view of half-precision memory (a converted view would come out dense)
        t = torch.randn(2, 65, length + 5, generator=gen).half()[:, 1::2, 3:3 + length]
    else:
        t = make(2, 32, length, torch.float16, layout, gen, TRITON.device)
    (aligned,), channels_last = attention._v2_inputs(t)
    assert channels_last == (layout == "channel_last")
    assert (aligned.data_ptr() != t.data_ptr()) == copied and torch.equal(aligned, t)
    unit, pitch = (1, 2) if channels_last else (2, 1)
    assert aligned.stride(unit) == 1 and aligned.stride(pitch) % 16 == 0 and aligned.stride(0) % 16 == 0
    if not channels_last:
        load_len = attention._load_len(length, channels_last)
        assert load_len % 16 == 0
        padded = torch.as_strided(aligned, (2, 32, load_len), aligned.stride())
        assert not padded[:, :, length:].any()
