"""Autograd with inputs that do and do not require grad, in every combination (issue 7, item 5).

For every public differentiable op (channel_pool, gated_spatial_pool, cbam_apply, each with both
tie rules where it has one, and spatial_attention) and for the fused modules whose autograd
depends on which of their inputs and parameters are trainable (CBAM of both flavours in train and
eval mode, NonLocal2d, whose separate theta/phi/g convs make q, k, v require grad independently),
on every backend that runs here: each subset of the differentiable inputs (for modules: x and the
parameter groups) requires grad, and one more call runs under torch.no_grad(). Checked: the
outputs require grad exactly when some input does (never under no_grad); after backward, exactly
the inputs that require grad have a .grad, and it obeys the docs/DESIGN.md §4 error rule against the
float64 reference; the others keep .grad None.
"""
import contextlib
import copy
import functools
import itertools

import pytest
import torch

import fastattn
from _util import GRAD_ATOL, assert_error_rule, compiled_backends, randomize

BACKENDS = ["reference"] + compiled_backends("cpu")
NO_GRAD = "no_grad"  # every input requires grad, the call runs under torch.no_grad()


def _subsets(names):
    """(label, mask) for every subset of `names` requiring grad, then the no_grad call."""
    cases = []
    for mask in itertools.product([False, True], repeat=len(names)):
        label = "+".join(n for n, m in zip(names, mask) if m) or "none"
        cases.append((label, mask))
    return cases + [(NO_GRAD, (True,) * len(names))]


# --- ops ------------------------------------------------------------------------------------------

def _cbam_inputs(g):
    # random, so no ties: every max has one position and a well-defined gradient
    return [torch.randn(2, 3, 4, 5, generator=g), torch.rand(2, 3, generator=g), torch.rand(2, 1, 4, 5, generator=g)]


def _attention_inputs(g):
    # Lk != Lq, d_v != d_qk, two heads
    return [torch.randn(2, 8, 3, 3, generator=g), torch.randn(2, 8, 2, 3, generator=g),
            torch.randn(2, 4, 2, 3, generator=g)]


# name -> (input names, inputs from a generator, function (backend, *inputs) -> tuple of outputs)
OPS = {
    "channel_pool": (("x",), lambda g: _cbam_inputs(g)[:1],
                     lambda b, x: fastattn.channel_pool(x, backend=b)),
    "channel_pool_first": (("x",), lambda g: _cbam_inputs(g)[:1],
                           lambda b, x: fastattn.channel_pool(x, ties="first", backend=b)),
    "gated_spatial_pool": (("x", "ch_gate"), lambda g: _cbam_inputs(g)[:2],
                           lambda b, x, ch: (fastattn.gated_spatial_pool(x, ch, backend=b),)),
    "gated_spatial_pool_first": (("x", "ch_gate"), lambda g: _cbam_inputs(g)[:2],
                                 lambda b, x, ch: (fastattn.gated_spatial_pool(x, ch, ties="first", backend=b),)),
    "cbam_apply": (("x", "ch_gate", "sp_gate"), _cbam_inputs,
                   lambda b, x, ch, sp: (fastattn.cbam_apply(x, ch, sp, backend=b),)),
    "spatial_attention": (("q", "k", "v"), _attention_inputs,
                          lambda b, q, k, v: (fastattn.spatial_attention(q, k, v, heads=2, backend=b),)),
}


def _op_cases():
    return [pytest.param(op, mask, no_grad, id=f"{op}-{label}")
            for op, (names, _, _) in OPS.items()
            for label, mask in _subsets(names)
            for no_grad in [label == NO_GRAD]]


def _outputs_and_grads(fn, backend, inputs, cots):
    """Outputs and the gradients of all inputs (all requiring grad): the reference's numbers."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(backend, *inputs)
    return [o.detach() for o in outs], torch.autograd.grad(outs, inputs, cots)


@functools.lru_cache(None)
def _op_expected(op):
    """(inputs, cotangents, float64 truth, float32 eager) of `op`, once for all its cases."""
    _, make_inputs, fn = OPS[op]
    g = torch.Generator().manual_seed(0)
    base = make_inputs(g)
    cots = [torch.randn(o.shape, generator=g) for o in fn("reference", *base)]
    truth = _outputs_and_grads(fn, "reference", [t.double() for t in base], [c.double() for c in cots])
    return base, cots, truth, _outputs_and_grads(fn, "reference", base, cots)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,mask,no_grad", _op_cases())
def test_op_grads_follow_requires_grad(backend, op, mask, no_grad):
    names, _, fn = OPS[op]
    base, cots, (truth, g_truth), (eager, g_eager) = _op_expected(op)
    inputs = [t.clone().requires_grad_(m) for t, m in zip(base, mask)]
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        outs = fn(backend, *inputs)

    wants_grad = any(mask) and not no_grad
    for i, (o, t, e) in enumerate(zip(outs, truth, eager)):
        assert o.requires_grad == wants_grad, (
            f"output {i}: requires_grad={o.requires_grad}, inputs' requires_grad: {dict(zip(names, mask))}, "
            f"no_grad={no_grad}")
        assert_error_rule(f"output {i}", o.detach(), t, e)
    if wants_grad:
        torch.autograd.backward(outs, cots)
    for name, t, m, gt, ge in zip(names, inputs, mask, g_truth, g_eager):
        if m and not no_grad:
            assert t.grad is not None, f"{name} requires grad but got no .grad"
            assert_error_rule(f"grad {name}", t.grad, gt, ge)
        else:
            assert t.grad is None, f"{name}: .grad must stay None (requires_grad={m}, no_grad={no_grad})"


# --- modules --------------------------------------------------------------------------------------

# name -> (constructor, input shape, {parameter group: the child modules holding it}, train modes)
MODULES = {
    "cbam_timm": (lambda: fastattn.nn.CBAM(8, 2, flavor="timm"), (2, 8, 5, 5),
                  {"mlp": ("channel",), "spatial": ("spatial",)}, (True, False)),
    "cbam_official": (lambda: fastattn.nn.CBAM(8, 2, flavor="official"), (2, 8, 5, 5),
                      {"mlp": ("ChannelGate",), "spatial": ("SpatialGate",)}, (True, False)),
    # the fused path adds no train/eval logic of its own here: train mode only
    "nonlocal": (lambda: fastattn.nn.NonLocal2d(8, 2), (2, 8, 4, 4),
                 {"theta": ("theta",), "phi": ("phi",), "g": ("g",), "out": ("out_conv", "out_norm")}, (True,)),
}


def _module_cases():
    cases = []
    for kind, (_, _, groups, modes) in MODULES.items():
        for train in modes:
            for label, mask in _subsets(("x", *groups)):
                mode = "train" if train else "eval"
                cases.append(pytest.param(kind, train, mask, label == NO_GRAD, id=f"{kind}-{mode}-{label}"))
    return cases


def _run(module, backend, x):
    if backend == "reference":  # the fused code path over the op contract in PyTorch
        return type(module)._fused(module, x, "reference")
    module.backend = backend
    return module(x)


def _module_grads(module, x, grad_y):
    """Output and the gradients of x and of every parameter, all requiring grad, on the eager path."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(grad_y)
    return y.detach(), {"x": x.grad, **{name: p.grad for name, p in module.named_parameters()}}


def _module(kind, train):
    module = MODULES[kind][0]()
    randomize(module)
    return module.train(train)


@functools.lru_cache(None)
def _module_expected(kind, train):
    """(x, grad_y, float64 truth, float32 eager) of the reference layer's own forward, once per module."""
    eager = _module(kind, train)
    eager.backend = "reference"
    g = torch.Generator().manual_seed(1)
    x, grad_y = torch.randn(MODULES[kind][1], generator=g), torch.randn(MODULES[kind][1], generator=g)
    truth = _module_grads(copy.deepcopy(eager).double(), x.double(), grad_y.double())
    return x, grad_y, truth, _module_grads(eager, x, grad_y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,train,mask,no_grad", _module_cases())
def test_module_grads_follow_requires_grad(backend, kind, train, mask, no_grad):
    groups = MODULES[kind][2]
    module = _module(kind, train)
    x0, grad_y, (y_truth, g_truth), (y_eager, g_eager) = _module_expected(kind, train)

    x_grad, group_grads = mask[0], dict(zip(groups, mask[1:]))
    trainable = {}
    for group, children in groups.items():
        for child in children:
            for name, p in getattr(module, child).named_parameters():
                p.requires_grad_(group_grads[group])
                trainable[f"{child}.{name}"] = group_grads[group]
    assert trainable.keys() == dict(module.named_parameters()).keys(), "a parameter is in no group"
    x = x0.clone().requires_grad_(x_grad)
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        y = _run(module, backend, x)

    wants_grad = any(mask) and not no_grad
    assert y.requires_grad == wants_grad, (
        f"y: requires_grad={y.requires_grad}, x requires grad: {x_grad}, trainable groups: {group_grads}, "
        f"no_grad={no_grad}")
    assert_error_rule("y", y.detach(), y_truth, y_eager)
    if wants_grad:
        y.backward(grad_y)
    got = {"x": x.grad, **{name: p.grad for name, p in module.named_parameters()}}
    wants = {"x": x_grad, **trainable}
    for name, wanted in wants.items():
        if wanted and not no_grad:
            assert got[name] is not None, f"{name} requires grad but got no .grad"
            assert_error_rule(f"grad {name}", got[name], g_truth[name], g_eager[name],
                              atol=None if name == "x" else GRAD_ATOL[got[name].dtype])
        else:
            assert got[name] is None, f"{name}: .grad must stay None (requires_grad={wanted}, no_grad={no_grad})"
