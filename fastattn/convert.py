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

from torch import nn

from fastattn import reference
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
    if not isinstance(getattr(sp.conv, "aa", nn.Identity()), nn.Identity):
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


def _rules():
    """(class, flavor, problem finder) for every layer type convert knows."""
    rules = [(reference.OfficialCBAM, "official", _official_cbam_problem)]
    try:
        from timm.layers import cbam as timm_cbam
    except ImportError:  # timm is optional: without it there are no timm layers to find
        timm_cbam = None
    if timm_cbam is not None:
        rules += [(timm_cbam.LightCbamModule, "timm_light", _timm_cbam_problem),
                  (timm_cbam.CbamModule, "timm", _timm_cbam_problem)]
    rules += [(reference.TimmCBAM, None, _timm_cbam_problem)]
    return rules


def _convert_one(m: nn.Module, rules, backend: str):
    """-> (fused module or None, reason it was left alone or None)."""
    if isinstance(m, CBAM):
        return None, None
    for cls, flavor, problem in rules:
        if type(m) is cls:
            if flavor is None:  # fastattn's own timm twin says which variant it is
                flavor = "timm_light" if m.channel.light else "timm"
            reason = problem(m)
            if reason:
                return None, reason
            return CBAM.from_module(m, flavor, backend), None
    return None, None


def convert(model: nn.Module, *, inplace: bool = False, backend: str = "auto", return_report: bool = False):
    """Replace every timm CbamModule / LightCbamModule and fastattn.reference CBAM
    twin in `model` with fastattn.nn.CBAM holding the same submodules.

    Returns the converted model (a deep copy unless inplace=True), or
    (model, ConversionReport) with return_report=True. The report is also
    logged at INFO level on the "fastattn" logger.
    """
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
