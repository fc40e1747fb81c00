"""Reliability (issue 7): bad input in a subprocess (no case may crash the
process), determinism, inputs left untouched, thread safety, no leaks over 1 000
calls, edge sizes, NaN/Inf propagation and float16 range. What the parity files
already cover (large-logit forward, CBAM empty batch, one position) is not repeated."""
import os
import re
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import reference
from _util import assert_equal_values, assert_error_rule, compiled_backends, interpreted, run_case_script, run_in_threads

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = compiled_backends("cpu")
SHAPE = re.compile(r"\(\d+(, \d+)*,?\)")


# --- bad input ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_input_results():
    """Runs tests/_bad_inputs.py once; a crash (segfault, abort) of that process fails every test."""
    return run_case_script(os.path.join(HERE, "_bad_inputs.py"))


def _case_names():
    sys.path.insert(0, HERE)
    import _bad_inputs
    return [case for case, *_ in _bad_inputs.all_cases()]


@pytest.mark.parametrize("case", _case_names())
def test_bad_input_raises_clear_error(bad_input_results, case):
    result = next(r for r in bad_input_results if r["case"] == case)
    arg, kind, message = result["arg"], result["type"], result["message"]
    if arg == "backend":
        # an unknown name is a ValueError; a known backend that cannot run the case says why
        assert kind in ("ValueError", "BackendUnavailable"), f"{case}: {kind}: {message}"
        assert "backend" in message, f"{case}: the message must name the backend: {message}"
        return
    assert kind in ("ValueError", "TypeError"), f"{case}: raised {kind}: {message}"
    assert re.search(rf"\b{arg}\b", message), f"{case}: the message must name {arg!r}: {message}"
    # a value-only argument (heads=0, ties='max', q a list) has no shape to name
    value_only = arg in ("heads", "ties") and "divide" not in message or "torch.Tensor" in message
    assert value_only or SHAPE.search(message), f"{case}: the message must give the shapes: {message}"


# --- determinism ----------------------------------------------------------------------------------

def _attention_fwd_bwd(backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 32, 9, 11, generator=g).requires_grad_() for _ in range(3))
    out = fastattn.spatial_attention(q, k, v, heads=4, backend=backend)
    out.backward(torch.randn(out.shape, generator=g))
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
def test_attention_is_bitwise_deterministic_on_cpu():
    first, second = _attention_fwd_bwd("cpu"), _attention_fwd_bwd("cpu")
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert_equal_values(f"{name} of a second identical call", b, a)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("flavor", ["timm", "official"])
def test_cbam_module_is_bitwise_deterministic_on_cpu(flavor):
    def run():
        torch.manual_seed(0)
        module = fastattn.nn.CBAM(64, reduction=8, flavor=flavor, backend="cpu").train()
        x = torch.randn(2, 64, 13, 9).relu().requires_grad_()  # ties in the max pools
        y = module(x)
        y.backward(torch.randn(y.shape))
        return [y.detach(), x.grad] + [p.grad for p in module.parameters()]
    first, second = run(), run()
    for i, (a, b) in enumerate(zip(first, second)):
        assert_equal_values(f"output/grad {i} of a second identical call", b, a)


# --- inputs are never modified --------------------------------------------------------------------

def _public_calls(backend):
    """(name, function of the inputs, inputs) for every public op."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 4, 3, generator=g).contiguous(memory_format=torch.channels_last)
    ch, sp = torch.rand(2, 5, generator=g), torch.rand(2, 1, 4, 3, generator=g)
    q, k, v = (torch.randn(2, 4, 3, 5, generator=g) for _ in range(3))
    kw = dict(backend=backend)
    return [
        ("channel_pool split", lambda a: fastattn.channel_pool(a, **kw), [x]),
        ("channel_pool first", lambda a: fastattn.channel_pool(a, ties="first", **kw), [x]),
        ("gated_spatial_pool", lambda a, b: fastattn.gated_spatial_pool(a, b, **kw), [x, ch]),
        ("gated_spatial_pool first", lambda a, b: fastattn.gated_spatial_pool(a, b, ties="first", **kw), [x, ch]),
        ("cbam_apply", lambda a, b, c: fastattn.cbam_apply(a, b, c, **kw), [x, ch, sp]),
        ("spatial_attention", lambda a, b, c: fastattn.spatial_attention(a, b, c, heads=2, **kw), [q, k, v]),
        ("spatial_attention 3-D", lambda a, b, c: fastattn.spatial_attention(a, b, c, **kw),
         [t.flatten(2).transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]),
    ]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_inputs_and_grad_outputs_are_not_modified(backend):
    for name, fn, inputs in _public_calls(backend):
        inputs = [t.requires_grad_() for t in inputs]
        before = [t.detach().clone() for t in inputs]
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        cots = [torch.randn_like(o) for o in outs]
        cots_before = [c.clone() for c in cots]
        torch.autograd.grad(outs, inputs, cots)
        for i, (t, b) in enumerate(zip(inputs, before)):
            assert torch.equal(t.detach(), b) and t.stride() == b.stride(), f"{backend} {name}: input {i} modified"
        for i, (c, b) in enumerate(zip(cots, cots_before)):
            assert torch.equal(c, b), f"{backend} {name}: grad_output {i} modified"


# --- threads --------------------------------------------------------------------------------------

@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
def test_two_threads_get_correct_results():
    def work(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 16 + seed, 7, 7, generator=g)
        ch, sp = torch.rand(2, 16 + seed, generator=g), torch.rand(2, 7, 7, generator=g)
        q, k, v = (torch.randn(1, 8, 10 + seed, generator=g) for _ in range(3))
        return ((x, ch, sp), (q, k, v))

    def results(cbam_in, attn_in, backend):
        x, ch, sp = cbam_in
        return [*fastattn.channel_pool(x, backend=backend), fastattn.gated_spatial_pool(x, ch, backend=backend),
                fastattn.cbam_apply(x, ch, sp, backend=backend),
                fastattn.spatial_attention(*attn_in, heads=2, backend=backend)]

    cases = {seed: work(seed) for seed in (0, 1)}
    expected = {seed: results(*cases[seed], "reference") for seed in cases}

    def loop(seed):
        for _ in range(200):
            for got, want in zip(results(*cases[seed], "cpu"), expected[seed]):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    run_in_threads(loop, list(cases))


# --- no leaks -------------------------------------------------------------------------------------

_LEAK_SCRIPT = r"""
import gc, os, warnings, torch, fastattn

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def live_tensors():
    with warnings.catch_warnings():  # isinstance on some lazily deprecated module attributes warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

q, k, v = (torch.randn(1, 8, 6, 6).requires_grad_() for _ in range(3))

def step():
    out = fastattn.spatial_attention(q, k, v, heads=2, backend="cpu")
    torch.autograd.grad(out.sum(), (q, k, v))

for _ in range(100):  # warm-up: allocator caches, lazily built dispatch tables
    step()
gc.collect()
tensors, before = live_tensors(), rss()
gc.disable()  # anything a reference cycle keeps alive shows up in gc.collect() below
for _ in range(1000):
    step()
gc.enable()
print(gc.collect(), tensors, live_tensors(), rss() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc for the resident size")
@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
def test_no_leak_over_1000_calls():
    """In a fresh interpreter: state that earlier tests leave behind (torch.compile caches freed
    lazily) would otherwise show up as cycles collected during the loop."""
    result = subprocess.run([sys.executable, "-c", _LEAK_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    cycles, tensors_before, tensors_after, grown = map(int, result.stdout.split()[-4:])
    assert cycles < 10, f"{cycles} objects in reference cycles after 1000 calls"
    assert tensors_after <= tensors_before, f"live tensors grew from {tensors_before} to {tensors_after}"
    assert grown < 8 << 20, f"resident memory grew by {grown / 2**20:.1f} MiB over 1000 calls"


# --- edge sizes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("rank", [3, 4])
def test_attention_empty_batch(backend, rank):
    spatial = (4, 4) if rank == 4 else (16,)
    q, k, v = (torch.randn(0, 8, *spatial).requires_grad_() for _ in range(3))
    out = fastattn.spatial_attention(q, k, v, heads=2, backend=backend)
    assert out.shape == (0, 8, *spatial)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for t, g in zip((q, k, v), grads):
        assert g is None or (g.shape == t.shape and g.numel() == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_one_key_many_queries(backend):
    """Lk = 1: every query's softmax is exactly 1, so out = v broadcast and dk = 0."""
    lq = 300 if backend == "triton" and interpreted() else 5000
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, lq, generator=g).requires_grad_()
    k = torch.randn(2, 4, 1, generator=g).requires_grad_()
    v = torch.randn(2, 6, 1, generator=g).requires_grad_()
    grad_out = torch.randn(2, 6, lq, generator=g)
    out = fastattn.spatial_attention(q, k, v, heads=2, backend=backend)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    torch.testing.assert_close(out, v.detach().expand(2, 6, lq))
    torch.testing.assert_close(dv, grad_out.sum(2, keepdim=True), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dq, torch.zeros_like(dq), atol=1e-6, rtol=0)
    torch.testing.assert_close(dk, torch.zeros_like(dk), atol=1e-4, rtol=0)


# --- numerics under stress ------------------------------------------------------------------------

def _poison(t, where, value):
    t = t.clone()
    t[where] = value
    return t


def _grads(fn, inputs, cots):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [o.detach() for o in outs], list(torch.autograd.grad(outs, inputs, cots))


def _same_specials(case, fused, truth, eager):
    for i, (f, t, e) in enumerate(zip(fused, truth, eager)):
        assert torch.equal(f.isposinf(), t.isposinf()) and torch.equal(f.isneginf(), t.isneginf()), (
            f"{case}: output {i}: Inf positions differ from the reference")
        assert_error_rule(f"{case}: output {i}", f, t, e)


SPECIALS = [("nan", float("nan")), ("+inf", float("inf")), ("-inf", float("-inf"))]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the Triton interpreter, warns on NaN
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("special,value", SPECIALS)
@pytest.mark.parametrize("ties", ["split", "first"])
def test_cbam_nan_inf_propagate_like_reference(backend, special, value, ties):
    g = torch.Generator().manual_seed(5)
    x = _poison(torch.randn(2, 4, 5, 5, generator=g), (0, 1, 2, 3), value)
    ch = _poison(torch.rand(2, 4, generator=g), (1, 2), value)
    sp = _poison(torch.rand(2, 5, 5, generator=g), (1, 0, 4), value)
    cots = [torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g), torch.randn(2, 2, 5, 5, generator=g),
            torch.randn(2, 4, 5, 5, generator=g)]

    def fn_of(name):
        def primitives(x, ch, sp):
            avg, mx = fastattn.channel_pool(x, ties=ties, backend=name)
            return avg, mx, fastattn.gated_spatial_pool(x, ch, ties=ties, backend=name), \
                fastattn.cbam_apply(x, ch, sp, backend=name)
        return primitives
    truth = _grads(fn_of("reference"), [t.double() for t in (x, ch, sp)], [c.double() for c in cots])
    eager = _grads(fn_of("reference"), [x, ch, sp], cots)
    fused = _grads(fn_of(backend), [x, ch, sp], cots)
    _same_specials(f"{backend} {special} forward", fused[0], truth[0], eager[0])
    _same_specials(f"{backend} {special} grads", fused[1], truth[1], eager[1])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("special,value", SPECIALS)
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_attention_nan_inf_propagate_like_reference(backend, special, value, which):
    g = torch.Generator().manual_seed(6)
    inputs = [torch.randn(2, 8, 4, 5, generator=g) for _ in range(3)]
    index = "qkv".index(which)
    inputs[index] = _poison(inputs[index], (1, 5, 2, 3), value)  # head 1 of batch 1
    cot = torch.randn(2, 8, 4, 5, generator=g)

    def fn_of(name):
        return lambda q, k, v: fastattn.spatial_attention(q, k, v, heads=2, backend=name)
    truth = _grads(fn_of("reference"), [t.double() for t in inputs], [cot.double()])
    eager = _grads(fn_of("reference"), inputs, [cot])
    fused = _grads(fn_of(backend), inputs, [cot])
    _same_specials(f"{backend} {special} in {which}, forward", fused[0], truth[0], eager[0])
    _same_specials(f"{backend} {special} in {which}, grads", fused[1], truth[1], eager[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_cbam_near_the_float16_maximum_does_not_overflow(backend):
    """Pooling 6e4-sized float16 values: sums must be kept in float32, as the float32 reference does."""
    g = torch.Generator().manual_seed(7)
    x32 = 6e4 - 2e3 * torch.rand(2, 64, 8, 8, generator=g)
    x32[:, :, 0] *= -1  # large values of both signs
    ch32, sp32 = 0.5 + 0.5 * torch.rand(2, 64, generator=g), 0.5 + 0.5 * torch.rand(2, 8, 8, generator=g)
    x, ch, sp = (t.half() for t in (x32, ch32, sp32))
    ref = [*fastattn.channel_pool(x.float(), backend="reference"),
           fastattn.gated_spatial_pool(x.float(), ch.float(), backend="reference"),
           fastattn.cbam_apply(x.float(), ch.float(), sp.float(), backend="reference")]
    got = [*fastattn.channel_pool(x, backend=backend), fastattn.gated_spatial_pool(x, ch, backend=backend),
           fastattn.cbam_apply(x, ch, sp, backend=backend)]
    for name, r, f in zip(("avg", "max", "pooled", "y"), ref, got):
        assert f.dtype == torch.float16
        assert r.half().isfinite().all(), f"{name}: the float32 reference itself leaves float16 range"
        assert f.isfinite().all(), f"{name}: float16 result overflowed where the float32 reference did not"
        torch.testing.assert_close(f.float(), r.half().float(), atol=0, rtol=2e-3, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_logits_1e4_have_finite_grads(backend):
    """test_attention_functional covers the forward; here the backward at logits ~ 1e4."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 8, 4, 4, generator=g) for _ in range(3))
    q, k = q * 1e2, k * 1e2
    cot = torch.randn(1, 8, 4, 4, generator=g)

    def fn_of(name):
        return lambda a, b, c: fastattn.spatial_attention(a, b, c, scale=1.0, backend=name)
    truth = _grads(fn_of("reference"), [t.double() for t in (q, k, v)], [cot.double()])
    fused = _grads(fn_of(backend), [q, k, v], [cot])
    for name, f, t in zip(("out", "dq", "dk", "dv"), fused[0] + fused[1], truth[0] + truth[1]):
        assert f.isfinite().all(), f"{name} is not finite at logits ~ 1e4"
        # softmax is saturated: grads w.r.t. q, k are ~0 in exact arithmetic, any rounding is relative to 1e2
        torch.testing.assert_close(f.double(), t, atol=1e-3 * max(1.0, t.abs().max().item()), rtol=1e-3, msg=name)


@pytest.mark.parametrize("backend", [b for b in ("cpu",) if b in compiled_backends("cpu")])
def test_double_backward_raises_instead_of_a_wrong_answer(backend):
    q = torch.randn(1, 4, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    firsts = [fastattn.spatial_attention(q, q, q, backend=backend).sum(),
              sum(t.sum() for t in fastattn.channel_pool(x, backend=backend)),
              fastattn.cbam_apply(x, torch.rand(2, 3, dtype=torch.float64), torch.rand(2, 4, 5, dtype=torch.float64),
                                  backend=backend).pow(2).sum()]
    for first, inp in zip(firsts, (q, x, x)):
        grad, = torch.autograd.grad(first, inp, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            grad.pow(2).sum().backward()
    # the fused CBAM block's Function calls the same backward ops
    block = fastattn.nn.CBAM(8, 2, backend=backend).double()
    xb = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    grad, = torch.autograd.grad(block(xb).sum(), xb, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.pow(2).sum().backward()


@pytest.mark.parametrize("backend", [b for b in ("cpu",) if b in compiled_backends("cpu")])
def test_rows_of_70000_positions(backend):
    """Index arithmetic over long rows: 70 000 queries and keys (d = 4), and a 70 000-position CBAM plane."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 70_000, generator=g, dtype=torch.float64) for _ in range(3))
    out = fastattn.spatial_attention(q.float(), k.float(), v.float(), backend=backend)
    # the reference row by row in float64 for a few query positions (the full matrix would be 39 GB)
    rows = torch.tensor([0, 1, 34_999, 69_999])
    logits = (q[0, :, rows].T @ k[0]) * 0.5
    expect = torch.softmax(logits, -1) @ v[0].T
    torch.testing.assert_close(out[0, :, rows].T.double(), expect, atol=1e-5, rtol=1e-4)
    x = torch.randn(1, 2, 250, 280, generator=g)
    avg, mx = fastattn.channel_pool(x, backend=backend)
    torch.testing.assert_close(avg, x.mean((2, 3)))
    assert torch.equal(mx, x.amax((2, 3)))


@pytest.mark.skipif("triton" not in BACKENDS or not interpreted(),
                    reason="Triton on CPU tensors runs in its interpreter only; on a GPU, "
                           "test_triton_attention_ops.py::test_long_sequence_gpu covers long rows")
def test_rows_of_70000_positions_triton_interpreted():
    """Long rows through the Triton kernels in the interpreter: 70 000 keys for 16 queries (d = 16,
    float32; one program streams 4 375 key blocks), forward; and a 70 000-position CBAM plane
    (C = 2), the three primitives forward and backward. Checked against the float64 reference.

    Left out, too slow for the interpreter (measured on this 2-core machine, one thread, shared):
    the attention backward (Lq = 16, Lk = 70 000: 38 s), and Lq = 70 000 with Lk = 16 (4 375 query
    programs: forward 21 s, backward 48 s). Each program runs as Python, a few ms per key block,
    whatever d is. On a GPU, test_triton_attention_ops.py::test_long_sequence_gpu runs both
    directions forward and backward at Lq or Lk = 65 537.
    """
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 16, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 16, 70_000, generator=g, dtype=torch.float64) for _ in range(2))
    out = fastattn.spatial_attention(q.float(), k.float(), v.float(), backend="triton")
    truth = reference.spatial_attention(q, k, v)  # 16 x 70 000 logits: 9 MB in float64
    assert_error_rule("out", out, truth, reference.spatial_attention(q.float(), k.float(), v.float()))

    x = torch.randn(1, 2, 250, 280, generator=g)
    ch, sp = torch.rand(1, 2, generator=g), torch.rand(1, 250, 280, generator=g)
    cots = [torch.randn(1, 2, generator=g), torch.randn(1, 2, generator=g), torch.randn(1, 2, 250, 280, generator=g),
            torch.randn(1, 2, 250, 280, generator=g)]

    def fn_of(name):
        def primitives(x, ch, sp):
            avg, mx = fastattn.channel_pool(x, backend=name)
            pooled = fastattn.gated_spatial_pool(x, ch, backend=name)
            return avg, mx, pooled, fastattn.cbam_apply(x, ch, sp, backend=name)
        return primitives
    truth = _grads(fn_of("reference"), [t.double() for t in (x, ch, sp)], [c.double() for c in cots])
    eager = _grads(fn_of("reference"), [x, ch, sp], cots)
    fused = _grads(fn_of("triton"), [x, ch, sp], cots)
    for name, f, t, e in zip(("avg", "max", "pooled", "y", "dx", "d ch_gate", "d sp_gate"),
                             fused[0] + fused[1], truth[0] + truth[1], eager[0] + eager[1]):
        assert_error_rule(name, f, t, e)
