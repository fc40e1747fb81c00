"""Autocast rules of the fastattn ops: the dtypes eager PyTorch would give.

* spatial attention is a matmul-like op (as bmm and scaled_dot_product_attention
  are): under autocast its float32/float16/bfloat16 inputs are cast to the
  autocast dtype of their device, and the output has that dtype. float64 is
  never cast, as in PyTorch.
* the CBAM primitives are pooling and multiplication, which autocast leaves
  alone; mixed float inputs are promoted to the widest, as `x * gate` would be.

The functional wrappers apply the rules before validating their arguments (so
mixed dtypes under autocast are no error), and the same rules are registered as
Autocast kernels of the ops themselves, for callers of torch.ops.fastattn.*.
"""
from __future__ import annotations

import torch
from torch import Tensor

AUTOCAST_DEVICES = ("cpu", "cuda")


def _eligible(t, device_type: str) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 \
        and t.device.type == device_type


def lower_precision(device_type: str, args: tuple) -> tuple:
    """Casts eligible tensors of `args` to the autocast dtype of `device_type`."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(a.to(dtype) if _eligible(a, device_type) else a for a in args)


def promote(device_type: str, args: tuple) -> tuple:
    """Casts the float tensors of `args` to the widest float dtype among them."""
    floats = [a for a in args if isinstance(a, Tensor) and a.is_floating_point()]
    if len({a.dtype for a in floats}) < 2:
        return args
    widest = floats[0].dtype
    for a in floats[1:]:
        widest = torch.promote_types(widest, a.dtype)
    return tuple(a.to(widest) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def apply(rule, *tensors: Tensor) -> tuple:
    """The rule applied to the tensors of one call when autocast is on for their device."""
    first = next((t for t in tensors if isinstance(t, Tensor)), None)
    if first is None or first.device.type not in AUTOCAST_DEVICES \
            or not torch.is_autocast_enabled(first.device.type):
        return tensors
    return rule(first.device.type, tensors)


def register(lib: torch.library.Library, qualname: str, rule) -> None:
    """Registers `rule` as the AutocastCPU and AutocastCUDA kernel of op `qualname`.

    Like torch.library.register_autocast, but the target dtype is read when the
    op runs (the one the user gave torch.autocast), not fixed at registration."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    for device_type in AUTOCAST_DEVICES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _exclude=exclude):
            with torch._C._ExcludeDispatchKeyGuard(_exclude):
                return op(*rule(_device_type, args))

        lib.impl(name, kernel, key, with_keyset=True)


# forward op -> rule; the backward ops run outside autocast, in the forward's dtypes
OP_RULES = {
    "spatial_attention_forward": lower_precision,
    "gated_spatial_pool": promote,
    "cbam_apply": promote,
}
