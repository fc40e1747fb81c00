"""Autotune set-up of the Triton attention kernels (triton_kernels/attention.py): the preferred config
that runs with FASTATTN_TRITON_AUTOTUNE=0, and the memory-layout autotune key.

The preferred float32 configs were chosen from real compiles: each kernel compiled for sm_90a without a
GPU (triton.compile on an ASTSource with the JIT's own specialization, Triton 3.8) and Triton's bundled
ptxas -v read for "bytes spill stores". MEASURED_WORST_SPILL_FLOAT32 records that measurement; the test
checks the pruner's choice against it, so a new candidate or preference needs a new measurement.
"""
import importlib
import itertools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

attention = importlib.import_module("fastattn.triton_kernels.attention")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET else "cuda"
KERNELS = {"fwd": attention._spatial_attention_fwd_kernel, "dq": attention._spatial_attention_bwd_dq_kernel,
           "dkdv": attention._spatial_attention_bwd_dkdv_kernel}
BLOCK_DS = (16, 32, 64, 128, 256, 512)
LENGTHS = (1, 49, 196, 4097, 70000)

# (kernel, BLOCK_D) -> {candidate (BLOCK_M, BLOCK_N, num_warps, num_stages): bytes of spill stores}, float32,
# the most over 14 compiles: NCHW, channels_last and every-other-position strides, lengths 4096 and 4097, head
# dims BLOCK_D (2 heads) and a smaller non-multiple of 16 (1 head: 8, 24, 40, 72, 136, 264), and two mixed
# pairs (max(16, BLOCK_D / 4), BLOCK_D) and (BLOCK_D, 16). Candidates with tiles of at most 64 rows only.
MEASURED_WORST_SPILL_FLOAT32 = {
    ("fwd", 16): {(64, 64, 4, 3): 12, (64, 32, 4, 2): 8, (32, 16, 8, 1): 0, (32, 16, 4, 1): 0, (16, 16, 8, 1): 0,
                  (16, 16, 4, 1): 8},
    ("fwd", 32): {(64, 64, 4, 3): 692, (64, 32, 4, 2): 456, (32, 16, 8, 1): 0, (32, 16, 4, 1): 0, (16, 16, 8, 1): 0,
                  (16, 16, 4, 1): 0},
    ("fwd", 64): {(64, 64, 4, 3): 16480, (64, 32, 4, 2): 9624, (32, 16, 8, 1): 0, (32, 16, 4, 1): 0,
                  (16, 16, 8, 1): 0, (16, 16, 4, 1): 0},
    ("fwd", 128): {(64, 32, 4, 2): 20492, (32, 16, 8, 1): 0, (32, 16, 4, 1): 5688, (16, 16, 8, 1): 0,
                   (16, 16, 4, 1): 12},
    ("fwd", 256): {(32, 16, 8, 1): 4, (32, 16, 4, 1): 2588, (16, 16, 8, 1): 0, (16, 16, 4, 1): 80},
    # no candidate is clean at 512; (16, 16, 8, 1) spilled here only for NCHW with L not a multiple of 16
    ("fwd", 512): {(16, 16, 8, 1): 92, (16, 16, 4, 1): 1544},
    ("dq", 16): {(64, 64, 4, 2): 112, (64, 32, 4, 2): 8, (32, 32, 4, 2): 16, (32, 16, 8, 1): 0, (32, 16, 4, 1): 0,
                 (16, 16, 8, 1): 0, (16, 16, 4, 1): 0},
    ("dq", 32): {(64, 64, 4, 2): 616, (64, 32, 4, 2): 444, (32, 32, 4, 2): 0, (32, 16, 8, 1): 0, (32, 16, 4, 1): 0,
                 (16, 16, 8, 1): 4, (16, 16, 4, 1): 0},
    ("dq", 64): {(64, 64, 4, 2): 21048, (64, 32, 4, 2): 12428, (32, 32, 4, 2): 0, (32, 16, 8, 1): 0,
                 (32, 16, 4, 1): 0, (16, 16, 8, 1): 0, (16, 16, 4, 1): 0},
    ("dq", 128): {(64, 32, 4, 2): 24364, (32, 32, 4, 2): 10232, (32, 16, 8, 1): 0, (32, 16, 4, 1): 3864,
                  (16, 16, 8, 1): 4, (16, 16, 4, 1): 0},
    ("dq", 256): {(32, 16, 8, 1): 0, (32, 16, 4, 1): 16172, (16, 16, 8, 1): 0, (16, 16, 4, 1): 0},
    ("dq", 512): {(16, 16, 8, 1): 0, (16, 16, 4, 1): 908},
    ("dkdv", 16): {(64, 64, 4, 2): 6676, (32, 64, 4, 2): 0, (32, 32, 4, 2): 0, (16, 32, 8, 1): 0, (16, 32, 4, 1): 8,
                   (16, 16, 16, 1): 4, (16, 16, 4, 1): 0},
    ("dkdv", 32): {(64, 64, 4, 2): 2056, (32, 64, 4, 2): 576, (32, 32, 4, 2): 0, (16, 32, 8, 1): 8, (16, 32, 4, 1): 0,
                   (16, 16, 16, 1): 0, (16, 16, 4, 1): 0},
    ("dkdv", 64): {(64, 64, 4, 2): 16632, (32, 64, 4, 2): 16352, (32, 32, 4, 2): 32, (16, 32, 8, 1): 0,
                   (16, 32, 4, 1): 8, (16, 16, 16, 1): 0, (16, 16, 4, 1): 0},
    ("dkdv", 128): {(32, 64, 4, 2): 35912, (32, 32, 4, 2): 9708, (16, 32, 8, 1): 44, (16, 32, 4, 1): 1148,
                    (16, 16, 16, 1): 16, (16, 16, 4, 1): 0},
    ("dkdv", 256): {(16, 32, 8, 1): 0, (16, 32, 4, 1): 19800, (16, 16, 16, 1): 20, (16, 16, 4, 1): 144},
    # no candidate is clean at 512; (16, 16, 16, 1) spilled here only for NCHW with L not a multiple of 16
    ("dkdv", 512): {(16, 16, 16, 1): 140, (16, 16, 4, 1): 1400},
}

# The 16-bit preferred configs at a long sequence, as they were before float32 got its own preference.
PREFERRED_16BIT_LONG = {
    "fwd": {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 3),
            256: (64, 32, 4, 2), 512: (32, 16, 8, 1)},
    "dq": {16: (128, 32, 8, 2), 32: (128, 32, 8, 2), 64: (128, 32, 8, 2), 128: (128, 32, 8, 2),
           256: (64, 32, 4, 2), 512: (32, 16, 8, 1)},
    "dkdv": {16: (32, 128, 8, 2), 32: (32, 128, 8, 2), 64: (32, 128, 8, 2), 128: (32, 128, 8, 2),
             256: (32, 64, 4, 2), 512: (16, 32, 8, 1)},
}


def _as_tuple(config):
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _preferred(kernel, dtype, block_dqk, block_dv, length, monkeypatch):
    """The one config the pruner keeps with autotuning off, as (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    monkeypatch.setattr(attention, "_AUTOTUNE", False)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in attention._CANDIDATES[kernel]]
    kept = attention._config_pruner(kernel)(configs, {"q_ptr": torch.empty(0, dtype=dtype)}, BLOCK_DQK=block_dqk,
                                            BLOCK_DV=block_dv, LENGTH_BUCKET=attention._length_bucket(length))
    assert len(kept) == 1, kept
    return _as_tuple(kept[0])


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_float32_preferred_config_spills_least_of_the_measured(kernel, monkeypatch):
    """For every padded head dim, length and head-dim pairing (the larger one sets the tiles): a config
    measured to spill nothing, or where none is clean, one that spills least."""
    for block_d, length, other_d in itertools.product(BLOCK_DS, LENGTHS, (16, None)):
        dims = (block_d, block_d) if other_d is None else (block_d, min(other_d, block_d))
        measured = MEASURED_WORST_SPILL_FLOAT32[kernel, block_d]
        for block_dqk, block_dv in {dims, dims[::-1]}:
            chosen = _preferred(kernel, torch.float32, block_dqk, block_dv, length, monkeypatch)
            where = f"{kernel}: float32 BLOCK_DQK={block_dqk} BLOCK_DV={block_dv} L={length} prefers {chosen}"
            assert chosen in measured, f"{where}, which was not measured: {sorted(measured)}"
            assert measured[chosen] == min(measured.values()), (
                f"{where}, which spills {measured[chosen]} bytes; measured: {measured}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_16bit_preferred_config_is_unchanged(kernel, dtype, monkeypatch):
    for block_d in BLOCK_DS:
        chosen = _preferred(kernel, dtype, block_d, block_d, 70000, monkeypatch)
        assert chosen == PREFERRED_16BIT_LONG[kernel][block_d], (kernel, dtype, block_d)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_autotuning_still_times_every_candidate(kernel, monkeypatch):
    """The float32 preference only reorders: at BLOCK_D 16 every candidate fits, and all stay, preferred first."""
    preferred = _preferred(kernel, torch.float32, 16, 16, 70000, monkeypatch)
    monkeypatch.setattr(attention, "_AUTOTUNE", True)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in attention._CANDIDATES[kernel]]
    kept = attention._config_pruner(kernel)(configs, {"q_ptr": torch.empty(0, dtype=torch.float32)}, BLOCK_DQK=16,
                                            BLOCK_DV=16, LENGTH_BUCKET=attention._length_bucket(70000))
    assert sorted(map(id, kept)) == sorted(map(id, configs))
    assert _as_tuple(kept[0]) == preferred


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_layout_is_an_autotune_key_that_adds_no_compiled_variant(kernel):
    tuner = KERNELS[kernel]
    assert "LAYOUT" in tuner.keys and "LENGTH_BUCKET" in tuner.keys
    # specialized, the value 1 (channels_last) would compile a variant of its own
    jit = tuner.fn  # a JITFunction, or under the interpreter an InterpretedFunction holding the jit kwargs
    not_specialized = jit.do_not_specialize if hasattr(jit, "do_not_specialize") else jit.kwargs["do_not_specialize"]
    assert "LAYOUT" in not_specialized


def _view(layout, c=8, length=6, n=2):
    """(N, C, L) float32 with the memory layout named."""
    if layout == "contiguous":
        return torch.randn(n, c, length)
    if layout == "channels_last":  # as the API flattens a channels_last NCHW map
        return torch.randn(n, c, 2, length // 2).to(memory_format=torch.channels_last).flatten(2)
    if layout == "channel_slices":  # channels of a fused qkv tensor: positions still contiguous
        return torch.randn(n, 3 * c, length)[:, c:2 * c]
    return torch.randn(n, c, 2 * length)[:, :, ::2]  # every other position: neither axis contiguous


@pytest.mark.parametrize("layout,key", [
    ("contiguous", attention.LAYOUT_POSITIONS_CONTIGUOUS),
    ("channel_slices", attention.LAYOUT_POSITIONS_CONTIGUOUS),
    ("channels_last", attention.LAYOUT_CHANNELS_CONTIGUOUS),
    ("every_other_position", attention.LAYOUT_OTHER),
])
def test_layout_key_of_inputs(layout, key):
    assert attention._layout_key(_view(layout), _view(layout), _view(layout)) == key


def test_layout_key_of_mixed_inputs_is_other():
    assert attention._layout_key(_view("contiguous"), _view("channels_last")) == attention.LAYOUT_OTHER


@pytest.mark.parametrize("layout,key", [("contiguous", attention.LAYOUT_POSITIONS_CONTIGUOUS),
                                        ("channels_last", attention.LAYOUT_CHANNELS_CONTIGUOUS)])
def test_launchers_pass_the_layout_key_to_every_kernel(layout, key, monkeypatch):
    """The value each launch hands to the LAYOUT argument (so to the autotuner's key), read at the launch."""
    seen = {}
    for name, tuner in KERNELS.items():
        def spy(*args, _name=name, _tuner=tuner, _run=tuner.run, **kwargs):
            seen[_name] = dict(zip(_tuner.arg_names, args))["LAYOUT"]
            return _run(*args, **kwargs)
        monkeypatch.setattr(tuner, "run", spy)
    q, k, v = (_view(layout).to(DEVICE) for _ in range(3))
    out, lse = attention.spatial_attention_forward(q, k, v, 2, 0.5)
    attention.spatial_attention_backward(torch.ones_like(out), q, k, v, out, lse, 2, 0.5)
    assert seen == {"fwd": key, "dq": key, "dkdv": key}
