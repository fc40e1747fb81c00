"""diffusers: `Attention` of the 2-D attention blocks (AutoencoderKL's and UNet2DModel's
mid-blocks, AttnDownBlock2D, AttnUpBlock2D, ...), on 4-D hidden states.

Two ways in, one computation (`attention_on_map`): `fastattn.convert(model)` replaces each such
`Attention` by a `FusedAttention` (an `Attention` whose processor is fastattn's), and
`model.set_attn_processor(FastattnAttnProcessor())` switches every `Attention` of a diffusers
model to fastattn's processor, diffusers' own way. Either way a call the fused path does not
compute (3-D tokens, cross-attention, a mask, spatial_norm, dropout in training) runs diffusers'
default processor.
"""
from __future__ import annotations

from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import Tensor, nn

from fastattn import functional as FA
from fastattn._backend import BACKENDS, fused_or_fallback
from fastattn.convert import FusedTwin, Rule, linear_on_channels, param_dtype_problem

DEFAULT_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


def structure_problem(attn: Attention) -> str | None:
    """Why the fused path cannot compute this layer whatever the call (None: it can)."""
    if attn.spatial_norm is not None:
        return "spatial_norm (conditioned on temb): not fused"
    if attn.added_kv_proj_dim is not None:
        return "added KV projections: not fused"
    if attn.norm_q is not None or attn.norm_k is not None or attn.norm_cross is not None:
        return "q/k or cross-attention norms: not fused"
    if attn.is_causal:
        return "causal attention: not fused"
    if attn.fused_projections or attn.to_out is None or attn.to_k is None:
        return "fused QKV projections or no output projection: not fused"
    layers = (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])
    if any(type(layer) is not nn.Linear for layer in layers):
        return f"projections are {sorted({type(layer).__name__ for layer in layers})}, not nn.Linear"
    if not (attn.to_q.in_features == attn.to_k.in_features == attn.to_out[0].out_features == attn.query_dim):
        return "cross-attention or an output width other than the input's"
    if attn.to_q.out_features != attn.to_k.out_features or attn.to_q.out_features % attn.heads:
        return "q and k widths differ or are not divisible by heads"
    return None


def layer_problem(attn: Attention) -> str | None:
    """Why convert leaves this layer alone (None: it replaces it)."""
    if not attn._from_deprecated_attn_block:
        # diffusers builds the attention of its 2-D blocks, which attend over (N, C, H, W) maps, with this
        # flag; the others (transformer blocks) take token sequences
        return "attention over token sequences (not one of diffusers' 2-D attention blocks): not fused"
    if attn.is_cross_attention:
        return "cross-attention: not fused"
    if type(attn.processor) not in DEFAULT_PROCESSORS:
        return f"processor {type(attn.processor).__name__}: only AttnProcessor and AttnProcessor2_0 are replaced"
    head_dim = attn.to_q.out_features // attn.heads if type(attn.to_q) is nn.Linear else 0
    if type(attn.processor) is AttnProcessor2_0 and head_dim and attn.scale != head_dim ** -0.5:
        return "AttnProcessor2_0 ignores attn.scale (scale_qk=False): not fused"
    return structure_problem(attn)


def call_problem(attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs) -> str | None:
    """Why this call runs diffusers' processor rather than the fused path (None: it does not)."""
    kwargs.pop("temb", None)  # read only by spatial_norm, which structure_problem rules out
    if args or kwargs:
        return "extra arguments"
    if encoder_hidden_states is not None or attention_mask is not None:
        return "cross-attention or attention mask"
    if not isinstance(hidden_states, Tensor) or hidden_states.dim() != 4 or hidden_states.numel() == 0:
        return "hidden states are not a non-empty 4-D map"
    if hidden_states.shape[1] != attn.query_dim:
        return "channels differ from query_dim"
    if attn.training and attn.to_out[1].p > 0:
        return "dropout after the output projection in training: its mask follows diffusers' layout"
    return structure_problem(attn) or param_dtype_problem(attn, hidden_states)


def attention_on_map(attn: Attention, x: Tensor, backend: str) -> Tensor:
    """What AttnProcessor(2_0) computes on a 4-D map, on the map: (N, C, H, W) -> (N, C, H, W)."""
    n, c, h, w = x.shape
    normed = x if attn.group_norm is None else attn.group_norm(x)
    flat = normed.flatten(2)                                                     # (N, C, H*W), a view
    q, k, v = (linear_on_channels(layer, flat) for layer in (attn.to_q, attn.to_k, attn.to_v))
    a = FA.spatial_attention(q, k, v, heads=attn.heads, scale=attn.scale, backend=backend)
    out = attn.to_out[1](linear_on_channels(attn.to_out[0], a)).view(n, c, h, w)  # dropout: identity here
    if attn.residual_connection:
        out = out + x
    return out / attn.rescale_output_factor


class FastattnAttnProcessor:
    """A diffusers attention processor over fastattn.spatial_attention:
    `model.set_attn_processor(FastattnAttnProcessor())`. Self-attention on 4-D maps runs fused;
    any other call runs `fallback` (default: the processor diffusers would pick for the layer).
    """

    def __init__(self, backend: str = "auto", fallback=None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend, self.fallback = backend, fallback

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        def eager() -> Tensor:
            fallback = self.fallback or (AttnProcessor2_0() if attn.scale_qk else AttnProcessor())
            return fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        return fused_or_fallback(hidden_states, self.backend,
                                 lambda backend: attention_on_map(attn, hidden_states, backend), eager,
                                 call_problem(attn, hidden_states, encoder_hidden_states, attention_mask,
                                              *args, **kwargs))

    def __repr__(self) -> str:
        return f"FastattnAttnProcessor(backend={self.backend!r})"


class FusedAttention(FusedTwin, Attention):
    """diffusers `Attention` of a 2-D attention block with fastattn's processor: the layer's own
    submodules and keys; `set_attn_processor` and every other method of `Attention` work as before."""
    forward = Attention.forward  # through self.processor, so that a processor set later is honoured

    @classmethod
    def from_module(cls, layer: Attention, backend: str = "auto") -> "FusedAttention":
        twin = super().from_module(layer, backend)
        twin.processor = FastattnAttnProcessor(backend, fallback=layer.processor)
        return twin

    def _fused(self, x: Tensor, backend: str) -> Tensor:
        return attention_on_map(self, x, backend)


def rules() -> list[Rule]:
    return [Rule(Attention, layer_problem, FusedAttention.from_module)]
