"""Which CBAM blocks of a converted model may write over their input: convert(..., cbam_inplace=True).

A block may overwrite x only when nothing reads x after it. The proof is a torch.fx trace of the
whole model (fastattn's fused modules as leaves): every call of the block takes a value that is made
fresh by a known op (a conv, a norm, a linear layer, an activation that is not in place, an
arithmetic op), possibly through ops known to return their input itself (in-place activations,
Identity, Dropout), and no other node uses that value or any of those aliases. Anything else (a
model that does not trace, a value of unknown origin, the model's own input, a second reader, a
block called where one call is unproven) leaves the block out of place, with the reason.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

# modules whose output is a new tensor
_FRESH_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d, nn.GroupNorm,
                  nn.LayerNorm, nn.InstanceNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Upsample)
# activations: a new tensor, or their input itself with inplace=True
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.GELU,
                nn.Sigmoid, nn.Tanh)
# modules that return their input itself (Dropout in eval mode)
_IDENTITIES = (nn.Identity, nn.Dropout)
_FRESH_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                    torch.cat, torch.relu, torch.sigmoid, F.conv2d, F.silu, F.gelu}


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple):
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


def _origin(node: fx.Node, modules: dict) -> tuple[str, fx.Node | None]:
    """("fresh", None), ("alias", the node it returns), or ("unknown", None)."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _FRESH_MODULES) or (isinstance(m, _ACTIVATIONS) and not getattr(m, "inplace", False)):
            return "fresh", None
        if isinstance(m, _ACTIVATIONS + _IDENTITIES) and node.args and isinstance(node.args[0], fx.Node):
            return "alias", node.args[0]
    elif node.op == "call_function" and node.target in _FRESH_FUNCTIONS and not node.kwargs.get("inplace", False):
        return "fresh", None
    return "unknown", None


def _call_problem(call: fx.Node, modules: dict) -> str | None:
    """Why this call of a block may not write over its input (None: it may)."""
    if len(call.args) != 1 or call.kwargs or not isinstance(call.args[0], fx.Node):
        return "called with other than one positional tensor"
    aliases, node = [], call.args[0]
    while True:
        aliases.append(node)
        kind, source = _origin(node, modules)
        if kind == "fresh":
            break
        if kind == "unknown":
            what = "the model's input" if node.op == "placeholder" else f"{node.op} {node.target}"
            return f"its input comes from {what}, not proven to be a fresh tensor"
        node = source
    for value in aliases:
        for user in value.users:
            if user is not call and user not in aliases:
                return f"its input ({value.name}) is also used by {user.op} {user.target}"
    return None


def proven_inplace(model: nn.Module, blocks: dict[str, nn.Module], leaves: tuple) -> tuple[list, list]:
    """Of `blocks` (qualified name -> module, all in `model`): (names proven safe to run in place,
    [(name, reason) for the others])."""
    try:
        graph = _Tracer(leaves).trace(model)
    except Exception as e:  # noqa: BLE001 - any trace failure means: not proven
        reason = f"the model does not trace with torch.fx ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        return [], [(name, reason) for name in blocks]
    modules = dict(model.named_modules())
    calls: dict[str, list] = {name: [] for name in blocks}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in calls:
            calls[node.target].append(node)
    safe, refused = [], []
    for name, nodes in calls.items():
        problems = [p for p in (_call_problem(n, modules) for n in nodes) if p]
        if not nodes:
            refused.append((name, "not called by the traced forward"))
        elif problems:
            refused.append((name, problems[0]))
        else:
            safe.append(name)
    return safe, refused
