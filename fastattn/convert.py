"""fastattn.convert: swap known attention layers of a model for fused ones.

The fused module holds the original's submodules, so `state_dict` keys and
values do not change. Layers that look like a known type but use something the
fused kernels do not compute (another activation, a strided conv, ...) are left
alone, and the report says why.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from fastattn import nn as fnn
from fastattn import twins
from fastattn._backend import BACKENDS
from fastattn.nn import CBAM

log = logging.getLogger("fastattn")


@dataclass
class ConversionReport:
    replaced: Counter = field(default_factory=Counter)          # type name -> count
    skipped: list = field(default_factory=list)                 # (path, type name, reason)

    def __str__(self) -> str:
        lines = [f"fastattn.convert: replaced {sum(self.replaced.values())} layer(s)"]
        lines += [f"  {count} x {name}" for name, count in sorted(self.replaced.items())]
        if self.skipped:
            lines.append(f"left alone {len(self.skipped)} layer(s):")
            lines += [f"  {path} ({name}): {reason}" for path, name, reason in self.skipped]
        return "\n".join(lines)


def _is_sigmoid(m: nn.Module) -> bool:
    return type(m).__name__ == "Sigmoid"


def _conv_problem(conv: nn.Module, what: str) -> str | None:
    if not isinstance(conv, nn.Conv2d):
        return f"{what} is {type(conv).__name__}, not nn.Conv2d"
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros" \
            or isinstance(conv.padding, str) or conv.bias is not None:
        return f"{what} is not a stride-1, dilation-1, zero-padded conv without bias"
    return None


def _bn_problem(bn: nn.Module, what: str) -> str | None:
    if not isinstance(bn, nn.BatchNorm2d):
        return f"{what} is {type(bn).__name__}, not BatchNorm2d"
    for extra in ("act", "drop"):
        if not isinstance(getattr(bn, extra, nn.Identity()), nn.Identity):
            return f"{what}.{extra} is not Identity"
    return None


def _timm_cbam_problem(m: nn.Module) -> str | None:
    ch, sp = m.channel, m.spatial
    if not isinstance(ch.act, nn.ReLU):
        return f"channel MLP activation is {type(ch.act).__name__}; the fused block computes ReLU"
    if not (_is_sigmoid(getattr(ch, "gate", nn.Sigmoid())) and _is_sigmoid(sp.gate)):
        return "gates are not sigmoid"
    for fc in (ch.fc1, ch.fc2):
        if not isinstance(fc, nn.Conv2d) or fc.kernel_size != (1, 1) or fc.groups != 1:
            return "channel MLP is not two 1x1 convs"
    aa = getattr(sp.conv, "aa", None)  # timm >= 1.0 stores None when there is no anti-aliasing
    if aa is not None and not isinstance(aa, nn.Identity):
        return "spatial conv has anti-aliasing"
    return _conv_problem(sp.conv.conv, "spatial conv") or _bn_problem(sp.conv.bn, "spatial BN")


def _official_cbam_problem(m: nn.Module) -> str | None:
    if list(getattr(m.ChannelGate, "pool_types", ["avg", "max"])) != ["avg", "max"]:
        return "channel gate pool types are not ['avg', 'max']"
    if m.no_spatial:
        return None
    spatial = m.SpatialGate.spatial
    if spatial.relu is not None or spatial.bn is None:
        return "spatial BasicConv has a ReLU or no BN"
    return _conv_problem(spatial.conv, "spatial conv") or _bn_problem(spatial.bn, "spatial BN")


def _nonlocal_attn_problem(m: nn.Module) -> str | None:
    convs = (m.t, m.p, m.g)
    if not all(isinstance(c, nn.Conv2d) for c in convs) or len({c.out_channels for c in convs}) != 1:
        return "t, p and g are not Conv2d with equal out_channels (timm's forward views g with t's channels)"
    return None


def _no_problem(m: nn.Module) -> None:
    """fastattn's own attention twins: the fused block runs their submodules as they are."""
    return None


@dataclass(frozen=True)
class _Rule:
    cls: type
    problem: Callable[[nn.Module], str | None]      # why this layer cannot be fused, or None
    build: Callable[[nn.Module, str], nn.Module] | None  # (layer, backend) -> fused; None: never fused


def _cbam_rule(cls: type, flavor: str | None) -> _Rule:
    problem = _official_cbam_problem if flavor == "official" else _timm_cbam_problem

    def build(m: nn.Module, backend: str) -> nn.Module:
        # fastattn's own timm twin (flavor None) says which variant it is
        return CBAM.from_module(m, flavor or ("timm_light" if m.channel.light else "timm"), backend)
    return _Rule(cls, problem, build)


def _attention_rule(cls: type, fused_cls: type, problem=_no_problem) -> _Rule:
    return _Rule(cls, problem, fused_cls.from_module)


def _rules() -> list[_Rule]:
    """A rule for every layer type convert knows, matched by exact type."""
    rules = [_cbam_rule(twins.OfficialCBAM, "official"), _cbam_rule(twins.TimmCBAM, None),
             _attention_rule(twins.NonLocal2d, fnn.NonLocal2d),
             _attention_rule(twins.SelfAttention2d, fnn.SelfAttention2d),
             _attention_rule(twins.AttentionBlock2d, fnn.AttentionBlock2d),
             _attention_rule(twins.TimmNonLocalAttn, fnn.NonLocalAttn, _nonlocal_attn_problem)]
    try:
        from timm.layers import cbam as timm_cbam
        from timm.layers import non_local_attn as timm_nl
    except ImportError:  # timm is optional: without it there are no timm layers to find
        return rules
    return rules + [_cbam_rule(timm_cbam.LightCbamModule, "timm_light"), _cbam_rule(timm_cbam.CbamModule, "timm"),
                    _attention_rule(timm_nl.NonLocalAttn, fnn.NonLocalAttn, _nonlocal_attn_problem),
                    _Rule(timm_nl.BatNonLocalAttn,
                          lambda m: "bilinear attentional transform: no softmax attention to fuse", None)]


_FUSED = (CBAM, fnn.NonLocal2d, fnn.SelfAttention2d, fnn.AttentionBlock2d, fnn.NonLocalAttn)


def _convert_one(m: nn.Module, rules: list[_Rule], backend: str):
    """-> (fused module or None, reason it was left alone or None)."""
    if isinstance(m, _FUSED):
        return None, None
    for rule in rules:
        if type(m) is rule.cls:
            reason = rule.problem(m)
            if reason or rule.build is None:
                return None, reason
            return rule.build(m, backend), None
    for rule in rules:
        if rule.build is not None and isinstance(m, rule.cls):
            return None, f"a subclass of {rule.cls.__name__}, whose forward may differ from it"
    return None, None


def convert(model: nn.Module, *, inplace: bool = False, backend: str = "auto", return_report: bool = False):
    """Replace the attention layers of `model` that fastattn fuses with fused
    modules holding the same submodules, parameters and buffers:

      timm CbamModule, LightCbamModule, fastattn.twins.TimmCBAM, OfficialCBAM -> fastattn.nn.CBAM
      timm NonLocalAttn, fastattn.twins.TimmNonLocalAttn                    -> fastattn.nn.NonLocalAttn
      fastattn.twins.NonLocal2d / SelfAttention2d / AttentionBlock2d        -> fastattn.nn twins
    (fastattn.twins' classes are also importable as fastattn.reference.<name>: the same classes.)

    state_dict keys and values do not change, so checkpoints load both ways.
    Layers of those types whose configuration the fused block does not compute
    (and timm's BatNonLocalAttn, which has no softmax attention) are left alone,
    with the reason in the report.

    Returns the converted model (a deep copy unless inplace=True), or
    (model, ConversionReport) with return_report=True. The report is also
    logged at INFO level on the "fastattn" logger.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not inplace:
        model = copy.deepcopy(model)
    rules = _rules()
    report = ConversionReport()

    def visit(module: nn.Module, path: str) -> nn.Module:
        fused, reason = _convert_one(module, rules, backend)
        if fused is not None:
            report.replaced[type(module).__name__] += 1
            return fused
        if reason:
            report.skipped.append((path or "<root>", type(module).__name__, reason))
        for name, child in list(module.named_children()):
            new = visit(child, f"{path}.{name}" if path else name)
            if new is not child:
                setattr(module, name, new)
        return module

    model = visit(model, "")
    log.info("%s", report)
    return (model, report) if return_report else model
