"""Op registration on the Python side, derived from the op registry (fastattn._registry): fake
(meta) kernels, autograd formulas, autocast kernels, and the Triton ops.

The compiled ops (`torch.ops.fastattn.<op>`, schemas in csrc/ops.cpp) dispatch
by device to the CPU or CUDA kernels. The Triton kernels are registered as
ops of their own (`torch.ops.fastattn.triton_<op>`) with the same schemas, so
both go through one fake kernel and one autograd formula per op.
"""
from __future__ import annotations

import importlib
from typing import NamedTuple

import torch
from torch import Tensor

from fastattn import _autocast, _ext, _registry


class KernelSet:
    """The ops of one backend, by contract name: `kernels.channel_pool(...)`."""

    def __init__(self, name: str, lookup):
        self.name = name
        self._lookup = lookup

    def __getattr__(self, op: str):
        return self._lookup(op)

    def __repr__(self) -> str:
        return f"KernelSet({self.name!r})"


COMPILED = KernelSet("compiled", lambda op: getattr(torch.ops.fastattn, op))
TRITON = KernelSet("triton", lambda op: getattr(torch.ops.fastattn, "triton_" + op))
def _oracle_op(op: str):
    from fastattn import reference  # the tests' oracle, imported only when asked for (a plain import traces)
    return getattr(reference, "ref_" + op)


# The op contract in plain PyTorch: lets tests drive the fused modules' code path without kernels.
REFERENCE = KernelSet("reference", _oracle_op)


# ---------------------------------------------------------------------------
# cbam_grad_x's terms, named (the C++ kernels group them the same way, in GradXTerms)
# ---------------------------------------------------------------------------
class OutputTerm(NamedTuple):
    """dx += grad_y * ch_gate * sp_gate: the gradient through y = cbam_apply(x, ch_gate, sp_gate)."""
    grad_y: Tensor
    ch_gate: Tensor
    sp_gate: Tensor


class SpatialPoolTerm(NamedTuple):
    """dx += ch_gate * (grad_pooled[:, 0] / C + w * grad_pooled[:, 1]): the gradient through
    gated_spatial_pool(x, ch_gate), w the spatial max's tie weight; pooled, argmax, count are that
    op's outputs."""
    grad_pooled: Tensor
    ch_gate: Tensor
    pooled: Tensor
    argmax: Tensor
    count: Tensor


class ChannelMaxTerm(NamedTuple):
    """dx += w * grad_max: the gradient through channel_pool's max, w its tie weight; max, argmax,
    count are that op's outputs."""
    grad_max: Tensor
    max: Tensor
    argmax: Tensor
    count: Tensor


def grad_x_args(x: Tensor, *, output: OutputTerm | None = None, spatial_pool: SpatialPoolTerm | None = None,
                grad_avg: Tensor | None = None, channel_max: ChannelMaxTerm | None = None,
                split_ties: bool) -> tuple:
    """The positional arguments of the cbam_grad_x op (schema order) for the terms given; grad_avg is
    the term grad_avg / (H * W) through channel_pool's mean. The output and spatial-pool terms share
    the op's one ch_gate."""
    if output is not None and spatial_pool is not None and output.ch_gate is not spatial_pool.ch_gate:
        raise ValueError("the output and spatial_pool terms of cbam_grad_x must share one ch_gate tensor")
    ch_gate = output.ch_gate if output is not None else spatial_pool.ch_gate if spatial_pool is not None else None
    grad_y, _, sp_gate = output if output is not None else (None,) * 3
    grad_pooled, _, pooled, sp_argmax, sp_count = spatial_pool if spatial_pool is not None else (None,) * 5
    grad_max, ch_max, ch_argmax, ch_count = channel_max if channel_max is not None else (None,) * 4
    return (x, grad_y, ch_gate, sp_gate, grad_pooled, pooled, sp_argmax, sp_count, grad_avg, grad_max, ch_max,
            ch_argmax, ch_count, split_ties)


def cbam_grad_x(op, x: Tensor, **terms) -> Tensor:
    """op (a cbam_grad_x kernel: `kernels.cbam_grad_x`, a launcher, the oracle) called on the named
    terms of grad_x_args: dx, the x-sized gradient of the CBAM graph, the sum of the terms given."""
    return op(*grad_x_args(x, **terms))


def kernels_for(backend: str) -> KernelSet:
    if backend in ("cpu", "cuda"):
        _ext.require_compiled(backend)
        return COMPILED
    if backend == "triton":
        return TRITON
    if backend == "reference":
        return REFERENCE
    raise ValueError(f"no kernel set for backend {backend!r}")


# ---------------------------------------------------------------------------
# Autograd formulas, one per forward op, shared by the compiled and Triton ops
# ---------------------------------------------------------------------------
def _autograd_for(kernels: KernelSet) -> dict:
    def channel_pool_setup(ctx, inputs, output):
        x, split_ties = inputs
        _, mx, argmax, count = output
        ctx.split_ties = split_ties
        ctx.save_for_backward(x, mx, argmax, count)

    def channel_pool_backward(ctx, grad_avg, grad_max, _ga, _gc):
        x, mx, argmax, count = ctx.saved_tensors
        dx = cbam_grad_x(kernels.cbam_grad_x, x, grad_avg=grad_avg,
                         channel_max=ChannelMaxTerm(grad_max, mx, argmax, count), split_ties=ctx.split_ties)
        return dx, None

    def gated_spatial_pool_setup(ctx, inputs, output):
        x, gate, split_ties = inputs
        pooled, argmax, count = output
        ctx.split_ties = split_ties
        ctx.save_for_backward(x, gate, pooled, argmax, count)

    def gated_spatial_pool_backward(ctx, grad_pooled, _ga, _gc):
        x, gate, pooled, argmax, count = ctx.saved_tensors
        grad_pooled = grad_pooled.contiguous()
        dx = dgate = None
        if ctx.needs_input_grad[0]:
            dx = cbam_grad_x(kernels.cbam_grad_x, x, spatial_pool=SpatialPoolTerm(grad_pooled, gate, pooled, argmax,
                                                                                  count),
                             split_ties=ctx.split_ties)
        if ctx.needs_input_grad[1]:
            dgate = kernels.gated_spatial_pool_backward_gate(grad_pooled, x, gate, pooled, argmax, count,
                                                             ctx.split_ties)
        return dx, dgate, None

    def cbam_apply_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def cbam_apply_backward(ctx, grad_y):
        x, ch_gate, sp_gate = ctx.saved_tensors
        dx = dch = dsp = None
        if ctx.needs_input_grad[0]:
            dx = cbam_grad_x(kernels.cbam_grad_x, x, output=OutputTerm(grad_y, ch_gate, sp_gate), split_ties=False)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dch, dsp = kernels.cbam_apply_backward(grad_y, x, ch_gate, sp_gate)
        return dx, dch, dsp

    def attention_setup(ctx, inputs, output):
        q, k, v, heads, scale = inputs
        out, lse = output
        ctx.heads, ctx.scale = heads, scale
        ctx.save_for_backward(q, k, v, out, lse)

    def attention_backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = kernels.spatial_attention_backward(grad_out, q, k, v, out, lse, ctx.heads, ctx.scale)
        return dq, dk, dv, None, None

    return {
        "channel_pool": (channel_pool_setup, channel_pool_backward),
        "gated_spatial_pool": (gated_spatial_pool_setup, gated_spatial_pool_backward),
        "cbam_apply": (cbam_apply_setup, cbam_apply_backward),
        "spatial_attention_forward": (attention_setup, attention_backward),
    }


# ---------------------------------------------------------------------------
# Triton ops: thin custom ops around the launchers in fastattn.triton_kernels
# ---------------------------------------------------------------------------
def _triton_module(family: str):
    return importlib.import_module(f"fastattn.triton_kernels.{family}")


def _define_triton_ops() -> None:
    lib = torch.library.Library("fastattn", "FRAGMENT")
    for op, spec in _registry.OPS.items():
        if not spec.triton:
            continue
        name = "triton_" + op
        lib.define(name + spec.schema)

        def launch(*args, _op=op, _family=spec.family):
            return getattr(_triton_module(_family), _op)(*args)

        # CPU too: the Triton interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors.
        lib.impl(name, launch, "CUDA")
        lib.impl(name, launch, "CPU")
    _define_triton_ops.lib = lib  # keep the registrations alive


_AUTOCAST_LIB = torch.library.Library("fastattn", "IMPL")  # keeps the autocast kernels registered
_INPLACE_LIB = torch.library.Library("fastattn", "IMPL")  # keeps the in-place ops' autograd kernels registered

_INTERNAL_OP = ("fastattn::{op} is an internal op of the fused CBAM block (its forward and backward call it) "
                "and has no derivative of its own; double backward through the block is not supported")
_INFERENCE_OP = ("fastattn::{op} is the fused CBAM block's inference forward and has no derivative; the block "
                 "calls it only where no gradient is needed (no input or parameter requires grad, or grad mode is "
                 "off)")
_INPLACE_INFERENCE_OP = ("fastattn::{op} writes the CBAM block's output over x and has no derivative: the backward "
                         "would need the x it overwrites. It runs only where no gradient is wanted (grad mode off, "
                         "or no input requires grad); got {wanted} requiring grad")
_DOUBLE_BACKWARD = ("fastattn: double backward (a gradient of a gradient, create_graph=True) is not supported "
                    "through {op}; use backend='reference' for higher-order gradients")
_NO_DERIVATIVE = {_registry.INTERNAL: _INTERNAL_OP, _registry.INFERENCE: _INFERENCE_OP,
                  _registry.NO_DOUBLE_BACKWARD: _DOUBLE_BACKWARD}


def _raising_backward(message: str):
    """An autograd formula that raises `message`: a clear error instead of a silently wrong derivative."""
    def backward(ctx, *grads):
        raise RuntimeError(message)
    return backward


def _register_inplace(qualname: str, op: str) -> None:
    """The Autograd and ADInplaceOrView kernels of a mutating op (register_autograd takes functional ops only):
    a clear error where a gradient is wanted, and x's version counter bumped as PyTorch's in-place ops bump it,
    so a graph that saved x before the write notices it in backward."""
    overload = getattr(torch.ops.fastattn, qualname.split("::")[1]).default
    names = [a.name for a in overload._schema.arguments]

    def autograd_kernel(keyset, *args):
        if torch.is_grad_enabled():
            wanted = [name for name, a in zip(names, args) if isinstance(a, Tensor) and a.requires_grad]
            if wanted:
                raise RuntimeError(_INPLACE_INFERENCE_OP.format(op=op, wanted=", ".join(wanted)))
        return overload.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    def version_kernel(keyset, *args):
        torch.autograd.graph.increment_version(args[0])
        return overload.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)

    _INPLACE_LIB.impl(qualname, autograd_kernel, "Autograd", with_keyset=True)
    _INPLACE_LIB.impl(qualname, version_kernel, "ADInplaceOrView", with_keyset=True)


def _register() -> None:
    """Fake kernel, autograd and autocast kernels of every op in the registry, for the compiled ops
    (when fastattn._C loaded) and their Triton twins."""
    _define_triton_ops()
    for kernels, prefix in ((COMPILED, ""), (TRITON, "triton_")):
        if kernels is COMPILED and _ext._C is None:
            continue
        formulas = _autograd_for(kernels)
        for op, spec in _registry.OPS.items():
            if prefix and not spec.triton:
                continue
            qualname = f"fastattn::{prefix}{op}"
            torch.library.register_fake(qualname, spec.fake)
            if spec.autograd == _registry.FORMULA:
                setup, backward = formulas[op]
                torch.library.register_autograd(qualname, backward, setup_context=setup)
            elif spec.autograd == _registry.INPLACE_INFERENCE:
                _register_inplace(qualname, op)
            else:
                torch.library.register_autograd(qualname, _raising_backward(_NO_DERIVATIVE[spec.autograd].format(op=op)))
            if op in _autocast.OP_RULES:
                _autocast.register(_AUTOCAST_LIB, qualname, _autocast.OP_RULES[op])


_register()
