"""MONAI: SpatialAttentionBlock (monai.networks.blocks; 1-D, 2-D and 3-D, the attention blocks of
MONAI's AutoencoderKL and DiffusionModelUNet): GroupNorm, multi-head self-attention of its SABlock
over the positions, residual."""
from __future__ import annotations

from monai.networks.blocks import SABlock, SpatialAttentionBlock
from torch import Tensor, nn

from fastattn import functional as FA
from fastattn.convert import FusedTwin, Rule, linear_on_channels, param_dtype_problem


def layer_problem(m: SpatialAttentionBlock) -> str | None:
    sa = m.attn
    if type(sa) is not SABlock:
        return f"attn is {type(sa).__name__}, not SABlock"
    if sa.attention_dtype is not None:
        return f"attention_dtype={sa.attention_dtype} casts q and k: not fused"
    if sa.causal or sa.rel_positional_embedding is not None:
        return "causal or relative-position attention: not fused"
    if sa.save_attn:
        return "save_attn keeps the attention matrix, which the fused kernel never forms"
    projections = (sa.qkv,) if sa.use_combined_linear else (sa.to_q, sa.to_k, sa.to_v)
    if any(type(p) is not nn.Linear for p in projections) or type(sa.out_proj) not in (nn.Linear, nn.Identity):
        return "projections are not nn.Linear"
    if sa.inner_dim != m.norm.num_channels or sa.hidden_input_size != m.norm.num_channels:
        return "attention width differs from the block's channels"
    return None


class FusedSpatialAttentionBlock(FusedTwin, SpatialAttentionBlock):
    """x: (N, C, *spatial) -> x + out_proj(attention(q, k, v)) with q, k, v the SABlock's projections
    of norm(x), heads = C / num_head_channels, scale head_dim ** -0.5, computed on the map."""

    def _call_problem(self, x, *args, **kwargs) -> str | None:
        if args or kwargs:
            return "extra arguments"
        if not isinstance(x, Tensor) or x.dim() < 3 or x.shape[1] != self.norm.num_channels \
                or x.numel() == 0:
            return "not a non-empty map of the block's rank and channels"
        sa = self.attn
        if sa.dropout_rate > 0 and (sa.training or sa.use_flash_attention):  # SDPA's dropout_p applies in eval too
            return "attention dropout"
        return param_dtype_problem(self, x)

    def _fused(self, x: Tensor, backend: str) -> Tensor:
        sa = self.attn
        flat = self.norm(x).flatten(2)                                      # (N, C, L)
        if sa.use_combined_linear:  # MONAI's layout "(qkv heads d)": [q | k | v], each heads-major
            q, k, v = linear_on_channels(sa.qkv, flat).chunk(3, dim=1)
        else:
            q, k, v = (linear_on_channels(p, flat) for p in (sa.to_q, sa.to_k, sa.to_v))
        a = FA.spatial_attention(q, k, v, heads=sa.num_heads, scale=sa.scale, backend=backend)
        if sa.include_fc:
            a = linear_on_channels(sa.out_proj, a)
        return sa.drop_output(a).view(x.shape) + x


def rules() -> list[Rule]:
    return [Rule(SpatialAttentionBlock, layer_problem, FusedSpatialAttentionBlock.from_module)]
