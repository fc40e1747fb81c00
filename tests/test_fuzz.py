"""Property tests (hypothesis): random small shapes, layouts, dtypes, heads and
scales; every compiled backend that runs on the CPU must match backend="reference"
under the error rule of docs/DESIGN.md §4, forward and gradients, for
fastattn.spatial_attention and the three CBAM primitives; and fastattn.nn.CBAM
against the module it replaces (timm's or the official), in train and eval mode.

Bounded for CI: FUZZ_EXAMPLES examples per test (FASTATTN_FUZZ_EXAMPLES overrides,
e.g. 500 for a long run). Derandomized, so CI sees the same examples each run.
Triton runs through its interpreter here, which is slow: it gets tiny shapes and
half the examples."""
import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.layers.cbam import CbamModule, LightCbamModule

import fastattn
from fastattn import reference
from _util import GRAD_ATOL, assert_error_rule, compiled_backends, randomize, run_module

FUZZ_EXAMPLES = int(os.environ.get("FASTATTN_FUZZ_EXAMPLES", "25"))
LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced", "expanded")


def _settings(backend):
    examples = FUZZ_EXAMPLES if backend != "triton" else max(1, FUZZ_EXAMPLES // 2)
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _dtypes(backend):
    # the triton and cuda backends do not run float64; the Triton interpreter lacks bfloat16 math
    if backend == "cpu":
        return st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])
    return st.sampled_from([torch.float32, torch.float16])


def _tensor(shape, layout, gen, dtype, positive=False):
    """A tensor of `shape` in the given memory layout; "expanded" repeats sample 0 across the batch."""
    base = torch.rand(shape, generator=gen) if positive else torch.randn(shape, generator=gen)
    return _lay_out(base, layout, dtype)


def _lay_out(base, layout, dtype):
    """base's values in dtype and the given memory layout (see _tensor)."""
    base, shape = base.clone(), base.shape
    if layout == "expanded":
        base[1:] = base[:1]
    base = base.to(dtype)
    if layout == "channels_last" and base.dim() == 2:
        return base
    if layout == "channels_last" and base.dim() == 4:
        return base.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last":  # (N, C, L) with C innermost
        return base.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "transposed":  # last two dims swapped in memory
        return base.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "expanded":  # one sample shared by the batch: stride 0 along N
        return base[:1].expand(shape)
    if layout == "sliced" and base.dim() == 2:  # every other column of a wider matrix
        view = torch.zeros(shape[0], 2 * shape[1] + 1, dtype=dtype)[:, 1::2]
        view.copy_(base)
        return view
    if layout == "sliced":  # every other channel of a wider tensor, shifted by one position
        wide = torch.zeros(shape[0], 2 * shape[1], *shape[2:-1], shape[-1] + 1, dtype=dtype)
        view = wide[:, ::2, ..., 1:]
        view.copy_(base)
        return view
    return base


def _with_grads(fn, inputs, cotangents):
    inputs = [t.detach().requires_grad_(True) for t in inputs]  # detach keeps each input's strides
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, inputs, cotangents)
    return [o.detach() for o in outs], grads


def _check(names, fn_of_backend, backend, inputs, cotangents):
    """fused (backend) vs truth (reference in float64) vs eager (reference in the same dtype)."""
    truth = _with_grads(fn_of_backend("reference"), [t.double() for t in inputs], [c.double() for c in cotangents])
    eager = _with_grads(fn_of_backend("reference"), inputs, cotangents)
    fused = _with_grads(fn_of_backend(backend), inputs, cotangents)
    for part in (0, 1):
        for name, f, t, e in zip(names[part], fused[part], truth[part], eager[part]):
            assert f.dtype == e.dtype, f"{name}: dtype {f.dtype} != {e.dtype}"
            assert_error_rule(name, f, t, e)


@st.composite
def attention_case(draw, backend):
    tiny = backend == "triton"
    heads = draw(st.integers(1, 2 if tiny else 4))
    dq = draw(st.sampled_from([1, 2, 4, 8] if tiny else [1, 2, 3, 4, 8, 16, 20]))
    dv = draw(st.sampled_from([dq, 1, 3, 8]))
    n = draw(st.integers(1, 2 if tiny else 3))
    rank = draw(st.sampled_from([3, 4]))
    side = (1, 3) if tiny else (1, 6)
    if rank == 4:
        qs = (draw(st.integers(*side)), draw(st.integers(*side)))
        ks = (draw(st.integers(*side)), draw(st.integers(*side)))
    else:
        qs = (draw(st.integers(1, 9 if tiny else 40)),)
        ks = (draw(st.integers(1, 9 if tiny else 40)),)
    return dict(n=n, heads=heads, cq=heads * dq, cv=heads * dv, qs=qs, ks=ks,
                scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
                dtype=draw(_dtypes(backend)), layouts=draw(st.tuples(*[st.sampled_from(LAYOUTS)] * 3)),
                seed=draw(st.integers(0, 2**31 - 1)))


def _cbam_shape(draw, tiny):
    return (draw(st.integers(1, 2 if tiny else 3)), draw(st.integers(1, 5 if tiny else 40)),
            draw(st.integers(1, 4 if tiny else 12)), draw(st.integers(1, 4 if tiny else 12)))


@st.composite
def cbam_case(draw, backend):
    tiny = backend == "triton"
    shape = _cbam_shape(draw, tiny)
    return dict(shape=shape, dtype=draw(_dtypes(backend)), layout=draw(st.sampled_from(LAYOUTS)),
                gate_rank=draw(st.sampled_from([2, 4])),
                gate_layout=draw(st.sampled_from(("contiguous", "transposed", "sliced", "expanded"))), sp_rank=draw(st.sampled_from([3, 4])),
                ties=draw(st.sampled_from(["split", "first"])), seed=draw(st.integers(0, 2**31 - 1)))


def _fuzz(backend, strategy, body):
    """`body(case)` run over FUZZ_EXAMPLES cases drawn from strategy(backend); prints how many ran."""
    ran = []

    def counted(case):
        body(case)
        ran.append(case)
    _settings(backend)(given(strategy(backend))(counted))()
    print(f"{len(ran)} examples on backend {backend}")
    assert ran, "hypothesis ran no example"


@pytest.mark.parametrize("backend", compiled_backends("cpu"))
def test_spatial_attention_matches_reference(backend):
    def body(case):
        gen = torch.Generator().manual_seed(case["seed"])
        n, dtype = case["n"], case["dtype"]
        q = _tensor((n, case["cq"], *case["qs"]), case["layouts"][0], gen, dtype)
        k = _tensor((n, case["cq"], *case["ks"]), case["layouts"][1], gen, dtype)
        v = _tensor((n, case["cv"], *case["ks"]), case["layouts"][2], gen, dtype)
        grad_out = torch.randn(n, case["cv"], *case["qs"], generator=gen).to(dtype)

        def fn_of(name):
            return lambda a, b, c: fastattn.spatial_attention(a, b, c, heads=case["heads"], scale=case["scale"],
                                                              backend=name)
        _check((("out",), ("dq", "dk", "dv")), fn_of, backend, [q, k, v], [grad_out])

    _fuzz(backend, attention_case, body)


@pytest.mark.parametrize("backend", compiled_backends("cpu"))
def test_cbam_primitives_match_reference(backend):
    def body(case):
        gen = torch.Generator().manual_seed(case["seed"])
        n, c, h, w = shape = case["shape"]
        dtype, ties = case["dtype"], case["ties"]
        x = _tensor(shape, case["layout"], gen, dtype)
        ch_gate = _tensor((n, c), case["gate_layout"], gen, dtype, positive=True)
        sp_gate = _tensor((n, h, w), case["gate_layout"], gen, dtype, positive=True)
        if case["gate_rank"] == 4:
            ch_gate = ch_gate[:, :, None, None]
        if case["sp_rank"] == 4:
            sp_gate = sp_gate[:, None]
        cot = [torch.randn(s, generator=gen).to(dtype) for s in ((n, c), (n, c), (n, 2, h, w), shape)]

        def fn_of(name):
            def primitives(x, ch_gate, sp_gate):
                avg, mx = fastattn.channel_pool(x, ties=ties, backend=name)
                pooled = fastattn.gated_spatial_pool(x, ch_gate, ties=ties, backend=name)
                return avg, mx, pooled, fastattn.cbam_apply(x, ch_gate, sp_gate, backend=name)
            return primitives
        _check((("avg", "max", "pooled", "y"), ("dx", "d ch_gate", "d sp_gate")), fn_of, backend,
               [x, ch_gate, sp_gate], cot)

    _fuzz(backend, cbam_case, body)


# ---------------------------------------------------------------------------
# fastattn.nn.CBAM as a whole against the module it replaces
# ---------------------------------------------------------------------------
def _original_cbam(flavor, channels, reduction, kernel):
    if flavor == "timm":
        return CbamModule(channels, rd_ratio=1.0 / reduction, spatial_kernel_size=kernel)
    if flavor == "timm_light":
        return LightCbamModule(channels, rd_ratio=1.0 / reduction, spatial_kernel_size=kernel)
    return reference.OfficialCBAM(channels, reduction, kernel_size=kernel, no_spatial=flavor == "official-no-spatial")


@st.composite
def cbam_module_case(draw, backend):
    tiny = backend == "triton"
    shape = _cbam_shape(draw, tiny)
    # reductions past C: timm keeps one hidden unit, the official MLP has C // reduction = 0
    return dict(shape=shape, dtype=draw(_dtypes(backend)), layout=draw(st.sampled_from(LAYOUTS)),
                flavor=draw(st.sampled_from(["timm", "timm_light", "official", "official-no-spatial"])),
                reduction=draw(st.sampled_from([1, 2, 4, 16, 64])), kernel=draw(st.sampled_from([1, 3, 5, 7])),
                mode=draw(st.sampled_from(["train", "eval", "eval-no-grad"])), ties=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


def _compare_modules(original, fused, x, grad_y, mode, same_message):
    """fused (in x's dtype) against the original in float64 (truth) and in x's dtype (eager): y, the
    gradients (parameters at GRAD_ATOL) and the float buffers; where the original raises, the fused
    raises the same type (and message, with same_message)."""
    dtype = x.dtype
    raised = (ValueError, RuntimeError)
    truth = run_module(copy.deepcopy(original).double(), x.double(), grad_y.double(), mode, catch=raised)
    eager = run_module(copy.deepcopy(original).to(dtype), x, grad_y, mode, catch=raised)
    got = run_module(fused.to(dtype), x, grad_y, mode, catch=raised)
    if isinstance(truth, Exception):
        assert isinstance(got, type(truth)) and (str(got) == str(truth) or not same_message), (truth, got)
        return
    assert not isinstance(got, Exception), got
    assert_error_rule("y", got[0], truth[0], eager[0])
    assert got[1].keys() == truth[1].keys()
    for part in (1, 2):  # gradients, then buffers (running statistics)
        for name in truth[part]:
            assert_error_rule(name, got[part][name], truth[part][name], eager[part][name],
                              atol=GRAD_ATOL[dtype] if part == 1 and name != "x" else None)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the official MLP past C
@pytest.mark.parametrize("backend", compiled_backends("cpu"))
def test_cbam_module_matches_original(backend):
    """Whole modules: every flavour, spatial kernel, reduction (also past C), layout, dtype and mode
    (train: batch statistics and the running-stat update; eval with grad: the autograd path; eval
    without grad: the one-op inference path on cpu). Where the original raises, so must the fused."""
    def body(case):
        gen = torch.Generator().manual_seed(case["seed"])
        n, c, h, w = shape = case["shape"]
        dtype, flavor = case["dtype"], case["flavor"]
        original = _original_cbam(flavor, c, case["reduction"], case["kernel"])
        randomize(original, case["seed"])
        fused = fastattn.nn.CBAM(c, case["reduction"], flavor=flavor.removesuffix("-no-spatial"),
                                 spatial_kernel=case["kernel"], no_spatial=flavor == "official-no-spatial",
                                 backend=backend)
        fused.load_state_dict(original.state_dict())
        values = torch.randn(shape, generator=gen)
        if case["ties"]:  # ReLU'd and rounded: exact ties in the maxima
            values = values.relu().round(decimals=1)
        x = _lay_out(values, case["layout"], dtype)
        grad_y = torch.randn(shape, generator=gen).to(dtype)
        _compare_modules(original, fused, x, grad_y, case["mode"], same_message=True)

    _fuzz(backend, cbam_module_case, body)


# ---------------------------------------------------------------------------
# The spatial-attention blocks as a whole against their reference twins
# ---------------------------------------------------------------------------
def _attention_block(kind, draw, tiny):
    """(channels, reference twin, fused block of `backend`) of a random configuration."""
    if kind == "nonlocal":
        channels, reduction = draw(st.integers(1, 8 if tiny else 24)), draw(st.sampled_from([1, 2, 4]))
        options = dict(inter_channels=draw(st.one_of(st.none(), st.integers(1, 8))),
                       sub_sample=draw(st.booleans()), use_scale=draw(st.booleans()))
        if options["inter_channels"] is None and channels // reduction == 0:
            options["inter_channels"] = 1
        return channels, lambda cls: cls.NonLocal2d(channels, reduction, **options)
    if kind == "sagan":
        channels = draw(st.sampled_from([8, 16] if tiny else [8, 16, 24, 32]))
        return channels, lambda cls: cls.SelfAttention2d(channels)
    if kind == "unet":
        heads, groups = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4]))
        channels, layout = heads * groups * draw(st.integers(1, 2 if tiny else 4)), draw(
            st.sampled_from(["chunked", "per_head"]))
        return channels, lambda cls: cls.AttentionBlock2d(channels, heads, groups=groups, qkv_layout=layout)
    channels, use_scale = draw(st.integers(1, 16 if tiny else 40)), draw(st.booleans())
    return channels, lambda cls: (cls.TimmNonLocalAttn if cls is reference else cls.NonLocalAttn)(channels, use_scale)


@st.composite
def attention_module_case(draw, backend):
    tiny = backend == "triton"
    kind = draw(st.sampled_from(["nonlocal", "sagan", "unet", "timm-nonlocal"]))
    channels, build = _attention_block(kind, draw, tiny)
    side = (1, 4 if tiny else 9)
    shape = (draw(st.integers(1, 2 if tiny else 3)), channels, draw(st.integers(*side)), draw(st.integers(*side)))
    return dict(kind=kind, build=build, shape=shape, dtype=draw(st.sampled_from([torch.float32, torch.float64]
                                                                                   if backend == "cpu" else [torch.float32])),
                layout=draw(st.sampled_from(LAYOUTS)), mode=draw(st.sampled_from(["train", "eval", "eval-no-grad"])),
                seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("backend", compiled_backends("cpu"))
def test_attention_modules_match_original(backend):
    """NonLocal2d, SelfAttention2d, AttentionBlock2d and NonLocalAttn against their twins: random
    channels, heads, groups, sub-sampling, maps down to 1x1, layouts and modes; same exceptions
    where the twin raises (SAGAN's pooling of a one-row map). float32 and float64 only: in 16-bit
    dtypes train-mode BatchNorm over a few positions amplifies rounding noise past the error rule
    on either side (the op-level fuzz above holds the attention kernels to it in every dtype)."""
    def body(case):
        gen = torch.Generator().manual_seed(case["seed"])
        dtype, shape = case["dtype"], case["shape"]
        original = case["build"](reference)
        randomize(original, case["seed"])
        fused = case["build"](fastattn.nn)
        fused.backend = backend
        fused.load_state_dict(original.state_dict())
        x = _lay_out(torch.randn(shape, generator=gen), case["layout"], dtype)
        grad_y = torch.randn(shape, generator=gen).to(dtype)
        _compare_modules(original, fused, x, grad_y, case["mode"], same_message=False)

    _fuzz(backend, attention_module_case, body)
