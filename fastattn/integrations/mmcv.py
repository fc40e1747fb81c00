"""mmcv (mmcv.cnn, as in mmcv-lite; used by mmdet, mmseg and mmaction2): NonLocal1d/2d/3d in the
softmax modes, embedded_gaussian and gaussian."""
from __future__ import annotations

import torch
from mmcv.cnn import ConvModule, NonLocal1d, NonLocal2d, NonLocal3d
from torch import Tensor, nn

from fastattn import functional as FA
from fastattn.convert import FusedTwin, Rule, param_dtype_problem

SOFTMAX_MODES = ("embedded_gaussian", "gaussian")


def _bare_conv(module: nn.Module) -> nn.Module | None:
    """The conv of a ConvModule that computes nothing but it (no padding layer, norm, activation or
    hook: its weight is the one the call uses); None otherwise."""
    if type(module) is not ConvModule or module.with_explicit_padding or module.with_norm \
            or module.with_activation:
        return None
    conv = module.conv
    hooked = any(m._forward_pre_hooks or m._forward_hooks for m in (module, conv))
    return None if hooked or not isinstance(conv, nn.modules.conv._ConvNd) else conv


def _one_conv_projections(m: nn.Module) -> bool:
    """theta, phi and g can run as one conv with their weights stacked (x read once, one GEMM for the
    three): bare convs of the same configuration on x (no sub-sampling pool after phi and g)."""
    if m.sub_sample:
        return False
    convs = [_bare_conv(module) for module in (m.theta, m.phi, m.g)]
    if None in convs:
        return False
    config = {(type(c), c.kernel_size, c.stride, c.padding, c.dilation, c.groups, c.padding_mode, c.bias is None)
              for c in convs}
    return len(config) == 1


def layer_problem(m: nn.Module) -> str | None:
    # any ConvModule configuration of g, theta, phi and conv_out computes the same: bare ones run stacked
    # (_one_conv_projections), the others are called as they are
    if m.mode not in SOFTMAX_MODES:
        return f"mode {m.mode!r} has no softmax attention to fuse"
    return None


class _FusedNonLocal(FusedTwin):
    """mmcv's _NonLocalNd in a softmax mode, on (N, C, *spatial) maps: y = softmax(scale q^T k) v over
    the positions with q = theta(x), k = phi(x) (embedded_gaussian; scale Ci ** -0.5 with use_scale)
    or q = x, k = x or its max pool (gaussian; scale 1), v = g(x); out = x + conv_out(y). Where theta,
    phi and g are bare convs of one configuration (no sub-sampling), they run as one conv with their
    weights stacked per call: x is read once and the three GEMMs, forward and backward, are one."""

    def _call_problem(self, x, *args, **kwargs) -> str | None:
        if args or kwargs:
            return "extra arguments"
        if not isinstance(x, Tensor) or x.dim() != self._spatial_dims + 2 or x.shape[1] != self.in_channels \
                or x.numel() == 0:
            return "not a non-empty map of the layer's rank and channels"
        return param_dtype_problem(self, x)

    def _fused(self, x: Tensor, backend: str) -> Tensor:
        n = x.shape[0]
        if self.mode == "gaussian":
            q, k = x, (self.phi(x) if self.sub_sample else x)
            scale = 1.0
            v = self.g(x)
        else:
            scale = self.inter_channels ** -0.5 if self.use_scale else 1.0
            if _one_conv_projections(self):
                convs = (self.theta.conv, self.phi.conv, self.g.conv)
                bias = None if convs[0].bias is None else torch.cat([c.bias for c in convs])
                q, k, v = convs[0]._conv_forward(x, torch.cat([c.weight for c in convs]), bias).chunk(3, dim=1)
            else:
                q, k, v = self.theta(x), self.phi(x), self.g(x)
        y = FA.spatial_attention(q.flatten(2), k.flatten(2), v.flatten(2), scale=scale, backend=backend)
        return x + self.conv_out(y.view(n, self.inter_channels, *x.shape[2:]))


class FusedNonLocal1d(_FusedNonLocal, NonLocal1d):
    _spatial_dims = 1


class FusedNonLocal2d(_FusedNonLocal, NonLocal2d):
    _spatial_dims = 2


class FusedNonLocal3d(_FusedNonLocal, NonLocal3d):
    _spatial_dims = 3


def rules() -> list[Rule]:
    return [Rule(cls, layer_problem, fused.from_module)
            for cls, fused in ((NonLocal1d, FusedNonLocal1d), (NonLocal2d, FusedNonLocal2d),
                               (NonLocal3d, FusedNonLocal3d))]
