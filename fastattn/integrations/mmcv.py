"""mmcv (mmcv.cnn, as in mmcv-lite; used by mmdet, mmseg and mmaction2): NonLocal1d/2d/3d in the
softmax modes, embedded_gaussian and gaussian."""
from __future__ import annotations

from mmcv.cnn import NonLocal1d, NonLocal2d, NonLocal3d
from torch import Tensor, nn

from fastattn import functional as FA
from fastattn.convert import FusedTwin, Rule, param_dtype_problem

SOFTMAX_MODES = ("embedded_gaussian", "gaussian")


def layer_problem(m: nn.Module) -> str | None:
    # g, theta, phi and conv_out are called as they are: any ConvModule configuration computes the same
    if m.mode not in SOFTMAX_MODES:
        return f"mode {m.mode!r} has no softmax attention to fuse"
    return None


class _FusedNonLocal(FusedTwin):
    """mmcv's _NonLocalNd in a softmax mode, on (N, C, *spatial) maps: y = softmax(scale q^T k) v over
    the positions with q = theta(x), k = phi(x) (embedded_gaussian; scale Ci ** -0.5 with use_scale)
    or q = x, k = x or its max pool (gaussian; scale 1), v = g(x); out = x + conv_out(y)."""

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
        else:
            q, k = self.theta(x), self.phi(x)
            scale = self.inter_channels ** -0.5 if self.use_scale else 1.0
        v = self.g(x)
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
