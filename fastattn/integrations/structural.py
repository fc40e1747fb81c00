"""Users' copies of two widely copied published blocks, matched by structure (any class name or
module path) and proven equal to the fused computation on a float64 probe before the swap:

- the official CBAM (Jongchan/attention-module cbam.py): CBAM -> ChannelGate (mlp = Sequential(Flatten,
  Linear, ReLU, Linear), pool_types) and SpatialGate (compress, spatial = BasicConv(conv, bn, relu=None));
- the non-local block of Non-local_pytorch (NONLocalBlock1D/2D/3D, _NonLocalBlockND): g, theta, phi, W,
  embedded-Gaussian or Gaussian; its dot-product and concatenation variants fail the probe (no softmax).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastattn import functional as FA
from fastattn.convert import Rule, cbam_rule, param_dtype_problem
from fastattn.nn import _FusedAttentionBlock

_PROBE_SPATIAL = {1: (6,), 2: (6, 4), 3: (2, 4, 4)}


def _children(m: nn.Module, *names: str) -> bool:
    return all(name in m._modules and m._modules[name] is not None for name in names)


def _ours(m: nn.Module) -> bool:
    return type(m).__module__.startswith("fastattn.")


def _is_official_cbam(m: nn.Module) -> bool:
    if _ours(m) or not _children(m, "ChannelGate") or not _children(m.ChannelGate, "mlp") \
            or not hasattr(m, "no_spatial"):
        return False
    mlp = m.ChannelGate.mlp
    if not (isinstance(mlp, nn.Sequential) and len(mlp) == 4 and type(mlp[0]).__name__ == "Flatten"
            and type(mlp[1]) is nn.Linear and type(mlp[2]) is nn.ReLU and type(mlp[3]) is nn.Linear):
        return False
    return m.no_spatial or (_children(m, "SpatialGate") and _children(m.SpatialGate, "compress", "spatial")
                            and _children(m.SpatialGate.spatial, "conv"))


def _cbam_probe(m: nn.Module) -> Tensor:
    return torch.randn(2, m.ChannelGate.mlp[1].in_features, 5, 6, dtype=torch.float64)


def _is_nonlocal_copy(m: nn.Module) -> bool:
    return (_children(m, "g", "W") and isinstance(getattr(m, "dimension", None), int)
            and isinstance(getattr(m, "in_channels", None), int) and isinstance(getattr(m, "inter_channels", None), int)
            and m.dimension in _PROBE_SPATIAL and not _ours(m))


def _nonlocal_probe(m: nn.Module) -> Tensor:
    return torch.randn(2, m.in_channels, *_PROBE_SPATIAL[m.dimension], dtype=torch.float64)


def _no_problem(m: nn.Module) -> None:
    return None


class NonLocalBlockCopy(_FusedAttentionBlock):
    """A user's copy of Non-local_pytorch's block: y = softmax(q^T k) v over the positions, no scaling,
    q = theta(x), k = phi(x) (embedded Gaussian) or q = x, k = phi(x) or x (Gaussian), v = g(x);
    z = W(y) + x. The copy's own forward runs for return_nl_map=True and for input it cannot compute."""

    def forward(self, x, *args, **kwargs):
        if args or kwargs or not isinstance(x, Tensor) or x.dim() != self.dimension + 2 \
                or x.shape[1] != self.in_channels or x.numel() == 0 or param_dtype_problem(self, x):
            return self._eager_cls.forward(self, x, *args, **kwargs)
        # checked above as the copy itself would take x (1-, 2- or 3-D maps): the original's own
        # errors for what it refuses, no rank-4 check of fastattn's modules
        return self._run(x, x.device)

    def _fused(self, x: Tensor, backend: str) -> Tensor:
        q = self.theta(x) if _children(self, "theta") else x
        k = self.phi(x) if _children(self, "phi") else x
        v = self.g(x)
        y = FA.spatial_attention(q.flatten(2), k.flatten(2), v.flatten(2), scale=1.0, backend=backend)
        return self.W(y.view(x.shape[0], self.inter_channels, *x.shape[2:])) + x


def rules() -> list[Rule]:
    return [cbam_rule(None, "official", matches=_is_official_cbam, probe=_cbam_probe),
            Rule(None, _no_problem, NonLocalBlockCopy.from_module, matches=_is_nonlocal_copy, probe=_nonlocal_probe)]
