"""BigGAN (pytorch_pretrained_biggan): SelfAttn, SAGAN attention with spectrally normalised 1x1
convs: q, k C/8 channels, v C/2, K and V 2x2 max-pooled, no scaling, x + gamma * o(y)."""
from __future__ import annotations

from pytorch_pretrained_biggan.model import SelfAttn
from torch import Tensor

from fastattn import functional as FA
from fastattn.convert import FusedTwin, Rule, param_dtype_problem


def layer_problem(m: SelfAttn) -> str | None:
    if m.in_channels % 8:
        return f"in_channels={m.in_channels} is not a multiple of 8: its forward views with ch // 8"
    return None


class FusedSelfAttn(FusedTwin, SelfAttn):
    """The convs are called as they are: spectral norm's hooks (power iteration in training) run as
    in the original."""

    def _call_problem(self, x, *args, **kwargs) -> str | None:
        if args or kwargs:
            return "extra arguments"
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            return "not a 4-D map with in_channels channels"
        h, w = x.shape[2:]
        # the original views the pooled map with h*w//4 positions: right only when that is (h//2)*(w//2)
        if x.shape[0] == 0 or h < 2 or w < 2 or (h // 2) * (w // 2) != h * w // 4:
            return "a map whose 2x2-pooled size is not h*w//4"
        return param_dtype_problem(self, x)

    def _fused(self, x: Tensor, backend: str) -> Tensor:
        q = self.snconv1x1_theta(x)
        k = self.maxpool(self.snconv1x1_phi(x))
        v = self.maxpool(self.snconv1x1_g(x))
        y = FA.spatial_attention(q, k, v, scale=1.0, backend=backend)
        return x + self.gamma * self.snconv1x1_o_conv(y)


def rules() -> list[Rule]:
    return [Rule(SelfAttn, layer_problem, FusedSelfAttn.from_module)]
