"""fastattn.convert: swap known attention layers of a model for fused ones.

The fused module holds the original's submodules, so `state_dict` keys and
values do not change. Layers that look like a known type but use something the
fused kernels do not compute (another activation, a strided conv, ...) are left
alone, and the report says why.
"""
from __future__ import annotations

import copy
import importlib
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from fastattn import nn as fnn
from fastattn import twins
from fastattn._backend import BACKENDS, fused_or_fallback
from fastattn.nn import CBAM

log = logging.getLogger("fastattn")


@dataclass
class ConversionReport:
    replaced: Counter = field(default_factory=Counter)          # type name -> count
    skipped: list = field(default_factory=list)                 # (path, type name, reason)
    inplace: list = field(default_factory=list)                 # paths of CBAM blocks set to inplace=True
    not_inplace: list = field(default_factory=list)             # (path, reason) of CBAM blocks left out of place

    def __str__(self) -> str:
        lines = [f"fastattn.convert: replaced {sum(self.replaced.values())} layer(s)"]
        lines += [f"  {count} x {name}" for name, count in sorted(self.replaced.items())]
        if self.skipped:
            lines.append(f"left alone {len(self.skipped)} layer(s):")
            lines += [f"  {path} ({name}): {reason}" for path, name, reason in self.skipped]
        if self.inplace:
            lines.append(f"in place: {len(self.inplace)} CBAM block(s): {', '.join(self.inplace)}")
        if self.not_inplace:
            lines.append(f"left out of place {len(self.not_inplace)} CBAM block(s):")
            lines += [f"  {path}: {reason}" for path, reason in self.not_inplace]
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


def timm_cbam_problem(m: nn.Module) -> str | None:
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


def official_cbam_problem(m: nn.Module) -> str | None:
    pool_types = list(getattr(m.ChannelGate, "pool_types", ["avg", "max"]))
    if pool_types != ["avg", "max"]:
        return f"channel gate pool types are {pool_types}, not ['avg', 'max']"
    if m.no_spatial:
        return None
    spatial = m.SpatialGate.spatial
    if spatial.relu is not None or spatial.bn is None:
        return "spatial BasicConv has a ReLU or no BN"
    return _conv_problem(spatial.conv, "spatial conv") or _bn_problem(spatial.bn, "spatial BN")


def nonlocal_attn_problem(m: nn.Module) -> str | None:
    convs = (m.t, m.p, m.g)
    if not all(isinstance(c, nn.Conv2d) for c in convs) or len({c.out_channels for c in convs}) != 1:
        return "t, p and g are not Conv2d with equal out_channels (timm's forward views g with t's channels)"
    return None


def _no_problem(m: nn.Module) -> None:
    """fastattn's own attention twins: the fused block runs their submodules as they are."""
    return None


@dataclass(frozen=True)
class Rule:
    """One line of convert's table. A layer matches by exact type (`cls`) or, for users' copies of
    published code, by structure (`matches`); `problem` says why a matching layer cannot be fused
    (None: it can); `build` makes the fused module (None: never fused). A structural rule also gives
    `probe`, a small float64 input for the layer: convert swaps only when the fused computation
    (`_fused` on the reference backend) equals the layer's own forward on it, in train and eval."""
    cls: type | None
    problem: Callable[[nn.Module], str | None]
    build: Callable[[nn.Module, str], nn.Module] | None   # (layer, backend) -> fused
    matches: Callable[[nn.Module], bool] | None = None
    probe: Callable[[nn.Module], Tensor] | None = None

    def applies(self, m: nn.Module) -> bool:
        return type(m) is self.cls if self.matches is None else self.matches(m)


def cbam_rule(cls: type | None, flavor: str | None, **structural) -> Rule:
    problem = official_cbam_problem if flavor == "official" else timm_cbam_problem

    def build(m: nn.Module, backend: str) -> nn.Module:
        # fastattn's own timm twin (flavor None) says which variant it is
        return CBAM.from_module(m, flavor or ("timm_light" if m.channel.light else "timm"), backend)
    return Rule(cls, problem, build, **structural)


def attention_rule(cls: type, fused_cls: type, problem=_no_problem) -> Rule:
    return Rule(cls, problem, fused_cls.from_module)


class FusedTwin:
    """Mixin of the fused twins of third-party layers: `class FusedX(FusedTwin, X)`. A twin
    holds the layer's own submodules, parameters, buffers and attributes (shared, not copied),
    so its state_dict is the layer's and every method of X is there. Its forward runs `_fused`
    when `_call_problem` finds nothing against the call and a kernel backend can run it;
    otherwise X's own forward, which also raises X's own errors for bad input."""
    backend = "auto"

    @classmethod
    def from_module(cls, layer: nn.Module, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        twin = cls.__new__(cls)
        # nn.Module keeps its parameters, buffers, children and hooks in dicts: each twin gets its own
        twin.__dict__.update({key: copy.copy(value) if isinstance(value, dict) else value
                              for key, value in layer.__dict__.items()})
        twin.backend = backend
        return twin

    def _call_problem(self, x, *args, **kwargs) -> str | None:
        """Why this call is not computed by `_fused` (None: it is)."""
        raise NotImplementedError

    def _fused(self, x: Tensor, backend: str) -> Tensor:
        raise NotImplementedError

    def forward(self, x, *args, **kwargs):
        return fused_or_fallback(x, self.backend, lambda backend: self._fused(x, backend),
                                 lambda: super(FusedTwin, self).forward(x, *args, **kwargs),
                                 self._call_problem(x, *args, **kwargs))


def param_dtype_problem(module: nn.Module, x) -> str | None:
    """What makes x no input for `module`'s fused path: not a floating tensor, or of another dtype or
    device than the module's parameters (the original raises its own error or promotes)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return "input is not a floating-point tensor"
    p = next(module.parameters(), None)
    if p is not None and (p.dtype != x.dtype or p.device != x.device):
        return f"input is {x.dtype} on {x.device}, parameters {p.dtype} on {p.device}"
    return None


def linear_on_channels(linear: nn.Linear, x: Tensor) -> Tensor:
    """nn.Linear over the channels of an (N, C, L) map: (N, out, L), no permute."""
    y = torch.matmul(linear.weight, x)
    return y if linear.bias is None else y + linear.bias[:, None]


_INTEGRATIONS = {  # fastattn.integrations module -> the library it needs (None: none)
    "timm": "timm", "diffusers": "diffusers", "mmcv": "mmcv", "monai": "monai",
    "biggan": "pytorch_pretrained_biggan", "structural": None,
}


def _rules() -> list[Rule]:
    """A rule for every layer type convert knows: fastattn's own reference layers here, each
    library's in fastattn.integrations.<library>, imported only once that library is: a model can
    hold a library's layers only then, and convert never pays for importing the others."""
    rules = [cbam_rule(twins.OfficialCBAM, "official"), cbam_rule(twins.TimmCBAM, None),
             attention_rule(twins.NonLocal2d, fnn.NonLocal2d),
             attention_rule(twins.SelfAttention2d, fnn.SelfAttention2d),
             attention_rule(twins.AttentionBlock2d, fnn.AttentionBlock2d),
             attention_rule(twins.TimmNonLocalAttn, fnn.NonLocalAttn, nonlocal_attn_problem)]
    for name, library in _INTEGRATIONS.items():
        if library is None or library in sys.modules:
            rules += importlib.import_module(f"fastattn.integrations.{name}").rules()
    return rules


_FUSED = (CBAM, fnn._FusedAttentionBlock, FusedTwin)
_PROBE_TOL = 1e-9


def _probe_problem(layer: nn.Module, fused: nn.Module, probe: Tensor) -> str | None:
    """Runs the layer and the fused computation on float64 copies (the model is not touched),
    in train and eval mode; None when they agree."""
    original, twin = copy.deepcopy(layer).double(), copy.deepcopy(fused).double()
    for training in (True, False):
        original.train(training)
        twin.train(training)
        try:
            with torch.no_grad():
                expected, got = original(probe), twin._fused(probe, "reference")
        except Exception as error:  # a structure that only looks right: the fused path cannot run it
            return f"the fused computation fails on a float64 probe: {type(error).__name__}: {error}"
        if not isinstance(expected, Tensor) or expected.shape != got.shape:
            return "the fused computation gives another output shape on a float64 probe"
        err = (expected - got).abs().max().item()
        if not err <= _PROBE_TOL * max(1.0, expected.abs().max().item()):
            return (f"matched by structure, but its forward differs from the fused computation on a float64 probe "
                    f"({'train' if training else 'eval'} mode, max error {err:.2e})")
    return None


def _convert_one(m: nn.Module, rules: list[Rule], backend: str):
    """-> (fused module or None, reason it was left alone or None)."""
    if isinstance(m, _FUSED):
        return None, None
    for rule in rules:
        if rule.applies(m):
            reason = rule.problem(m)
            if reason or rule.build is None:
                return None, reason
            fused = rule.build(m, backend)
            if rule.probe is not None:
                reason = _probe_problem(m, fused, rule.probe(m))
                if reason:
                    return None, reason
            return fused, None
    for rule in rules:
        if rule.build is not None and rule.cls is not None and isinstance(m, rule.cls):
            return None, f"a subclass of {rule.cls.__name__}, whose forward may differ from it"
    return None, None


def _mark_inplace(model: nn.Module, report: ConversionReport) -> None:
    from fastattn._inplace_proof import proven_inplace
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, CBAM)}
    safe, refused = proven_inplace(model, blocks, _FUSED)
    for name in safe:
        blocks[name].inplace = True
    report.inplace.extend(safe)
    report.not_inplace.extend((name or "<root>", reason) for name, reason in refused)


def convert(model: nn.Module, *, inplace: bool = False, backend: str = "auto", return_report: bool = False,
            cbam_inplace: bool = False):
    """Replace the attention layers of `model` that fastattn fuses with fused
    modules holding the same submodules, parameters and buffers:

      timm CbamModule, LightCbamModule, fastattn.twins.TimmCBAM, OfficialCBAM -> fastattn.nn.CBAM
      timm NonLocalAttn, fastattn.twins.TimmNonLocalAttn                    -> fastattn.nn.NonLocalAttn
      fastattn.twins.NonLocal2d / SelfAttention2d / AttentionBlock2d        -> fastattn.nn twins
      diffusers Attention (2-D blocks), mmcv NonLocal1d/2d/3d, MONAI SpatialAttentionBlock,
      BigGAN SelfAttn                                -> fused twins in fastattn.integrations.<library>
      users' copies of the official CBAM and of Non-local_pytorch's block (by structure,
      proven on a float64 probe)                     -> fastattn.nn.CBAM, integrations.structural
    (fastattn.twins' classes are also importable as fastattn.reference.<name>: the same classes.)

    state_dict keys and values do not change, so checkpoints load both ways.
    Layers of those types whose configuration the fused block does not compute
    (timm's BatNonLocalAttn, mmcv's dot_product and concatenation modes, which
    have no softmax attention, diffusers' cross-attention, ...) are left alone,
    with the reason in the report.

    cbam_inplace=True also sets inplace=True (nn.CBAM: y written over x, for inference) on the
    fused CBAM blocks that are proven not to need their input afterwards: a torch.fx trace of the
    model shows that each call's input is a fresh tensor (from a conv, norm, activation, ...)
    that nothing else reads (fastattn/_inplace_proof.py). The others stay out of place, with the
    reason in the report; a model that does not trace gets none.

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
    if cbam_inplace:
        _mark_inplace(model, report)
    log.info("%s", report)
    return (model, report) if return_report else model
