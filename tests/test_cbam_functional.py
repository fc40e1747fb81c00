"""The public CBAM primitives on every backend: parity with the eager
reference (values and gradients), tie rules, gradcheck, opcheck, bad input."""
import pytest
import torch

import fastattn
from fastattn import _ops, _registry
from _util import assert_error_rule, compiled_backends, interpreted

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _backends_and_shapes():
    cases = []
    for backend in compiled_backends("cpu"):
        small = backend == "triton" and interpreted()
        shapes = [(2, 3, 5, 7), (1, 17, 1, 1)] if small else [(2, 3, 7, 7), (8, 17, 13, 17), (1, 2048, 2, 3),
                                                              (1, 1, 56, 56)]
        cases += [(backend, s) for s in shapes]
    return cases


def _eager_primitives(x, ch_gate, sp_gate, split):
    """The three primitives written the eager way (timm's amax or official's max for ties)."""
    avg = x.mean((2, 3))
    mx = x.amax((2, 3)) if split else torch.nn.functional.adaptive_max_pool2d(x, 1).flatten(1)
    z = x * ch_gate[:, :, None, None]
    zmax = z.amax(1) if split else z.max(1)[0]
    pooled = torch.stack([z.mean(1), zmax], 1)
    y = x * ch_gate[:, :, None, None] * sp_gate[:, None]
    return avg, mx, pooled, y


def _fused_primitives(x, ch_gate, sp_gate, split, backend):
    ties = "split" if split else "first"
    avg, mx = fastattn.channel_pool(x, ties=ties, backend=backend)
    pooled = fastattn.gated_spatial_pool(x, ch_gate, ties=ties, backend=backend)
    y = fastattn.cbam_apply(x, ch_gate, sp_gate, backend=backend)
    return avg, mx, pooled, y


def _grads(fn, inputs, cotangents):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*inputs)
    grads = torch.autograd.grad(outs, inputs, cotangents)
    return outs, grads


@pytest.mark.parametrize("backend,shape", _backends_and_shapes())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [True, False], ids=["split", "first"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_primitives_match_reference(backend, shape, dtype, split, layout):
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip("float64 runs on the cpu backend only")
    if dtype == torch.bfloat16 and backend == "triton" and interpreted():
        pytest.skip("the Triton interpreter lacks bfloat16 math")
    torch.manual_seed(1)
    n, c, h, w = shape
    x = torch.randn(shape).relu().round(decimals=1)  # ties in every max
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    ch_gate, sp_gate = torch.rand(n, c), torch.rand(n, h, w)
    inputs = [t.to(dtype) for t in (x, ch_gate, sp_gate)]
    if layout == "nhwc":
        inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
    cot = [torch.randn(n, c), torch.randn(n, c), torch.randn(n, 2, h, w), torch.randn(shape)]

    truth, g_truth = _grads(lambda *a: _eager_primitives(*a, split), [t.double() for t in inputs],
                            [t.double() for t in cot])
    eager, g_eager = _grads(lambda *a: _eager_primitives(*a, split), inputs, [t.to(dtype) for t in cot])
    fused, g_fused = _grads(lambda *a: _fused_primitives(*a, split, backend), inputs, [t.to(dtype) for t in cot])
    for name, f, t, e in zip(("avg", "max", "pooled", "y"), fused, truth, eager):
        assert f.dtype == dtype
        assert_error_rule(name, f, t, e)
    if layout == "nhwc":
        assert fused[3].is_contiguous(memory_format=torch.channels_last), "y must keep x's memory format"
    for name, f, t, e in zip(("dx", "d ch_gate", "d sp_gate"), g_fused, g_truth, g_eager):
        assert_error_rule(name, f, t, e)


@pytest.mark.parametrize("split", [True, False], ids=["split", "first"])
def test_tie_rules(split):
    """All-equal planes: split gives each of the H*W positions 1/(H*W) of the max's
    gradient; first gives all of it to position 0."""
    for backend in ["reference"] + [b for b in compiled_backends("cpu") if b != "triton"]:
        x = torch.ones(1, 2, 3, 3, requires_grad=True)
        _, mx = fastattn.channel_pool(x, ties="split" if split else "first", backend=backend)
        mx.sum().backward()
        if split:
            expect = torch.full((1, 2, 3, 3), 1 / 9)
        else:
            expect = torch.zeros(1, 2, 3, 3)
            expect[:, :, 0, 0] = 1
        torch.testing.assert_close(x.grad, expect, msg=f"backend {backend}")


def test_nan_propagates_like_reference():
    x = torch.randn(2, 4, 5, 5)
    x[0, 1, 2, 3] = float("nan")
    for backend in [b for b in compiled_backends("cpu") if b != "triton"]:
        avg, mx = fastattn.channel_pool(x, backend=backend)
        ref_avg, ref_mx = fastattn.channel_pool(x, backend="reference")
        assert torch.equal(avg.isnan(), ref_avg.isnan()) and torch.equal(mx.isnan(), ref_mx.isnan())


@pytest.mark.parametrize("backend", ["reference"] + [b for b in compiled_backends("cpu") if b == "cpu"])
def test_gradcheck_float64(backend):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)  # no ties: max is differentiable
    g = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fastattn.channel_pool(t, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda t, u: fastattn.gated_spatial_pool(t, u, backend=backend), (x, g))
    assert torch.autograd.gradcheck(lambda t, u, v: fastattn.cbam_apply(t, u, v, backend=backend), (x, g, s))


def _opcheck_cases(device="cpu"):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    g = torch.rand(2, 3, device=device, requires_grad=True)
    s = torch.rand(2, 4, 5, device=device, requires_grad=True)
    pooled, argmax, count = _ops.REFERENCE.gated_spatial_pool(x.detach(), g.detach(), True)
    _, mx, cargmax, ccount = _ops.REFERENCE.channel_pool(x.detach(), True)
    gy, gp, gc = torch.randn_like(x), torch.randn_like(pooled), torch.randn(2, 3, device=device)
    xd, gd, sd = x.detach(), g.detach(), s.detach()
    return {
        "channel_pool": [(x, True), (x.contiguous(memory_format=torch.channels_last), False)],
        "gated_spatial_pool": [(x, g, True), (x, g, False)],
        "cbam_apply": [(x, g, s), (x.contiguous(memory_format=torch.channels_last), g, s)],
        "cbam_apply_backward": [(gy, x.detach(), g.detach(), s.detach())],
        "gated_spatial_pool_backward_gate": [(gp, x.detach(), g.detach(), pooled, argmax, count, True)],
        "cbam_grad_x": [_ops.grad_x_args(xd, output=_ops.OutputTerm(gy, gd, sd),
                                         spatial_pool=_ops.SpatialPoolTerm(gp, gd, pooled, argmax, count), grad_avg=gc,
                                         channel_max=_ops.ChannelMaxTerm(gc, mx, cargmax, ccount), split_ties=True),
                        _ops.grad_x_args(xd, grad_avg=gc, split_ties=False)],
    }


@pytest.mark.parametrize("prefix", ["", "triton_"])
@pytest.mark.parametrize("op", list(_opcheck_cases()))
def test_opcheck(prefix, op):
    backend = "triton" if prefix else "cpu"
    if backend not in compiled_backends("cpu"):
        pytest.skip(f"backend {backend} is not available here")
    packet = getattr(torch.ops.fastattn, prefix + op)
    for args in _opcheck_cases()[op]:
        torch.library.opcheck(packet, args)


BAD_INPUTS = [
    (lambda: fastattn.channel_pool(torch.randn(2, 3, 4)), ValueError, "x must be 4-D"),
    (lambda: fastattn.channel_pool(torch.ones(2, 3, 4, 4, dtype=torch.int32)), TypeError, "int32"),
    (lambda: fastattn.channel_pool(torch.ones(2, 3, 4, 4, dtype=torch.bool)), TypeError, "bool"),
    (lambda: fastattn.channel_pool(torch.ones(2, 3, 4, 4, dtype=torch.complex64)), TypeError, "complex64"),
    (lambda: fastattn.channel_pool(torch.ones(2, 3, 0, 4)), ValueError, "spatial position"),
    (lambda: fastattn.channel_pool([1.0]), TypeError, "torch.Tensor"),
    (lambda: fastattn.channel_pool(torch.ones(2, 3, 4, 4), ties="max"), ValueError, "ties"),
    (lambda: fastattn.gated_spatial_pool(torch.ones(2, 3, 4, 4), torch.ones(2, 4)), ValueError, r"\(2, 3\)"),
    (lambda: fastattn.gated_spatial_pool(torch.ones(2, 3, 4, 4), torch.ones(2, 3, dtype=torch.float64)),
     TypeError, "same dtype"),
    (lambda: fastattn.gated_spatial_pool(torch.ones(2, 3, 4, 4), torch.ones(2, 3, device="meta")),
     ValueError, "same device"),
    (lambda: fastattn.cbam_apply(torch.ones(2, 3, 4, 4), torch.ones(2, 3), torch.ones(2, 4, 5)), ValueError,
     "sp_gate"),
    (lambda: fastattn.cbam_apply(torch.ones(2, 3, 4, 4), torch.ones(2, 3), torch.ones(2, 2, 4, 4)), ValueError,
     "sp_gate"),
    (lambda: fastattn.cbam_apply(torch.ones(2, 3, 4, 4), torch.ones(3, 3), torch.ones(2, 4, 4)), ValueError,
     "ch_gate"),
    (lambda: fastattn.cbam_apply(torch.ones(2, 3, 4, 4), torch.ones(2, 3), torch.ones(2, 4, 4), backend="gpu"),
     ValueError, "backend"),
    (lambda: fastattn.cbam_apply(torch.ones(2, 3, 4, 4), torch.ones(2, 3), torch.ones(2, 4, 4), backend="cuda"),
     fastattn.BackendUnavailable, "cuda"),
]


@pytest.mark.parametrize("call,exc,match", BAD_INPUTS)
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_empty_batch():
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    avg, mx = fastattn.channel_pool(x)
    assert avg.shape == (0, 3) and mx.shape == (0, 3)
    y = fastattn.cbam_apply(x, torch.ones(0, 3), torch.ones(0, 4, 4))
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_explain_names_backend_and_reason():
    text = fastattn.explain("cbam", torch.ones(1))
    assert "backend" in text and "cpu" in text


def test_backend_choice_is_cached_per_key_and_refusals_are_not(monkeypatch):
    """choose() keeps its answers (a module call should not run the predicates again), keyed on
    everything they read; a named backend that cannot run keeps raising."""
    from fastattn import _backend

    cpu = torch.device("cpu")
    monkeypatch.setattr(_backend, "_CHOSEN", {})
    first = _backend.choose("cbam", cpu, torch.float32)
    assert _backend.choose("cbam", cpu, torch.float32) is first
    assert _backend.choose("cbam", cpu, torch.float64) is not first
    assert len(_backend._CHOSEN) == 2
    for _ in range(2):
        with pytest.raises(fastattn.BackendUnavailable, match="cuda"):
            _backend.choose("cbam", cpu, torch.float32, "cuda")
    assert len(_backend._CHOSEN) == 2
    # TRITON_INTERPRET decides whether the triton backend runs CPU tensors: part of the key
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastattn.BackendUnavailable, match="triton"):
        _backend.choose("cbam", cpu, torch.float32, "triton")
    if _backend.triton_available() is None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert _backend.choose("cbam", cpu, torch.float32, "triton")[0] == "triton"


# ---------------------------------------------------------------------------
# auto's per-op choice for CBAM on a GPU (a table lookup: no GPU needed)
# ---------------------------------------------------------------------------
_H100 = __import__("pathlib").Path(__file__).resolve().parents[1] / "bench" / "results" / "h100"
# the op names of bench/results/h100/triton-cbam-ops.bench.log
_TRITON_LOG_OPS = {"gsp_backward_gate": "gated_spatial_pool_backward_gate", "cbam_grad_x": "cbam_grad_x"}


def _h100_cbam_op_times() -> dict:
    """{(backend, op): us at 32x256x56x56 float16, NCHW plus channels_last} from the two H100 logs."""
    import re
    times = {}
    for line in (_H100 / "cuda-cbam-ops.bench.log").read_text().splitlines():
        m = re.match(r"\s*32x256x56x56\s+float16\s+\S+\s+(\w+):\s+([\d.]+) us", line)
        if m:
            times[("cuda", m[1])] = times.get(("cuda", m[1]), 0.0) + float(m[2])
    shape = None
    for line in (_H100 / "triton-cbam-ops.bench.log").read_text().splitlines():
        if line.startswith("("):  # a shape's header: "(32, 256, 56, 56) NCHW num_warps 4"
            shape = line.split(")")[0] + ")"
        m = re.match(r"\s+(\w+).*?\striton\s+([\d.]+) us", line)
        if m and shape == "(32, 256, 56, 56)":
            op = _TRITON_LOG_OPS.get(m[1], m[1])
            times[("triton", op)] = times.get(("triton", op), 0.0) + float(m[2])
    return times


@pytest.fixture
def gpu_predicates(monkeypatch):
    """Every backend can run (as on a GPU machine with fastattn built), fresh choice cache."""
    from fastattn import _backend
    monkeypatch.setattr(_backend, "_CHOSEN", {})
    for name in ("cuda", "triton"):
        monkeypatch.setitem(_backend._PREDICATES, name, lambda family, device, dtype: None)
    return _backend


def test_auto_picks_per_cbam_op_the_backend_faster_on_the_h100(gpu_predicates):
    """The table follows the committed H100 measurements: for every op the backend with the smaller
    NCHW + channels_last time at 32x256x56x56 float16."""
    times = _h100_cbam_op_times()
    cuda = torch.device("cuda")
    plan = dict(gpu_predicates.op_backends("cbam", cuda, torch.float16))
    assert sorted(plan) == sorted(name for name, spec in _registry.OPS.items() if spec.family == "cbam" and spec.triton)  # every CBAM op
    for op, backend in plan.items():
        faster = min(("cuda", "triton"), key=lambda b: times[(b, op)])
        assert backend == faster, (op, times[("cuda", op)], times[("triton", op)])
        name, why = gpu_predicates.choose("cbam", cuda, torch.float16, "auto", op)
        assert name == backend and "h100" in why.lower()
    assert plan["cbam_apply"] == "triton" and plan["channel_pool"] == "cuda"


def test_per_op_choice_falls_back_and_a_named_backend_runs_every_op(gpu_predicates, monkeypatch):
    cuda = torch.device("cuda")
    assert gpu_predicates.choose("cbam", cuda, torch.float16, "cuda", "cbam_apply")[0] == "cuda"
    assert gpu_predicates.op_backends("cbam", torch.device("cpu"), torch.float32) == ()
    monkeypatch.setitem(gpu_predicates._PREDICATES, "triton", lambda family, device, dtype: "no triton here")
    name, why = gpu_predicates.choose("cbam", cuda, torch.float16, "auto", "cbam_apply")
    assert name == "cuda" and "triton: no triton here" in why
    assert {b for _, b in gpu_predicates.op_backends("cbam", cuda, torch.float16)} == {"cuda"}


def test_explain_lists_each_cbam_op_on_a_gpu(gpu_predicates):
    from types import SimpleNamespace
    like = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)  # what explain reads of a tensor
    lines = fastattn.explain("cbam", like).splitlines()
    assert lines[0].endswith("per op:")
    assert "  cbam_apply: backend 'triton'" in "\n".join(lines)
    assert "  channel_pool: backend 'cuda'" in "\n".join(lines)
    assert len(lines) == 7
    assert "per op" not in fastattn.explain("cbam", like, backend="cuda")


def test_fused_cbam_runs_each_op_on_its_planned_backend(monkeypatch):
    """nn.CBAM under auto takes op_backends' plan op by op, forward and backward: mixing the cpu kernels
    with the op contract in PyTorch gives the all-cpu result."""
    from fastattn import _fused_cbam, nn as fnn
    if "cpu" not in compiled_backends("cpu"):
        pytest.skip("fastattn._C is not built")
    plan = (("channel_pool", "reference"), ("cbam_apply", "reference"), ("cbam_grad_x", "reference"))
    monkeypatch.setattr(fnn, "op_backends", lambda family, device, dtype: plan)
    used = []
    kernels_for = _fused_cbam.kernels_for
    monkeypatch.setattr(_fused_cbam, "kernels_for", lambda b: used.append(b) or kernels_for(b))
    torch.manual_seed(0)
    mixed = fnn.CBAM(32, 4).train()
    named = fnn.CBAM(32, 4, backend="cpu").train()
    named.load_state_dict(mixed.state_dict())
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    grad_y = torch.randn_like(x)
    results = []
    for module in (mixed, named):
        used.clear()
        xi = x.clone().requires_grad_(True)
        module.double()(xi).backward(grad_y)
        results.append((xi.grad, module.channel.fc1.weight.grad))
        if module is mixed:
            assert used == ["reference", "cpu", "reference", "cpu", "cpu", "reference"], used
    assert used == ["cpu"] * 6
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
