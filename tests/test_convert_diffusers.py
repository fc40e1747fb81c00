"""fastattn.convert and FastattnAttnProcessor on diffusers: the Attention of the 2-D attention
blocks, alone and in tiny AutoencoderKL and UNet2DModel models."""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor  # noqa: E402

import fastattn  # noqa: E402
from fastattn.integrations.diffusers import FastattnAttnProcessor, FusedAttention  # noqa: E402
from _convert_parity import (GPU_BACKENDS, check_layer, check_left_alone, check_model,  # noqa: E402
                             check_state_dict_round_trip, counting_fused_calls, randomize_)


def _attention(seed=0, channels=16, **kwargs):
    """As UNetMidBlock2D / the VAE build it, unless kwargs say otherwise."""
    torch.manual_seed(seed)
    config = dict(heads=1, dim_head=channels, norm_num_groups=8, residual_connection=True, bias=True,
                  upcast_softmax=True, _from_deprecated_attn_block=True)
    return randomize_(Attention(channels, **{**config, **kwargs}), seed)


@pytest.mark.parametrize("size", [(13, 17), (7, 7), (1, 1)])
def test_vae_attention(size):
    check_layer(_attention(), "Attention", (2, 16, *size))


def test_unet_attention_heads_no_bias_rescaled_attnprocessor():
    # upcast_softmax=False: AttnProcessor's "upcast" computes the softmax in float32, even of float64 input
    layer = _attention(channels=32, heads=4, dim_head=8, bias=False, rescale_output_factor=2.0,
                       upcast_softmax=False, processor=AttnProcessor())
    check_layer(layer, "Attention", (2, 32, 5, 6))


def test_no_group_norm_no_residual():
    check_layer(_attention(norm_num_groups=None, residual_connection=False), "Attention", (1, 16, 4, 9))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_on_gpu(backend):
    check_layer(_attention(), "Attention", (2, 16, 13, 17), device="cuda", backend=backend)
    check_layer(_attention(channels=32, heads=4, dim_head=8, bias=False, upcast_softmax=False, processor=AttnProcessor()),
                "Attention", (2, 32, 5, 6), device="cuda", backend=backend)


def test_left_alone_with_reasons():
    check_left_alone(_attention(cross_attention_dim=24), "cross-attention")
    check_left_alone(_attention(channels=32, spatial_norm_dim=8), "spatial_norm")
    check_left_alone(_attention(_from_deprecated_attn_block=False), "token sequences")
    check_left_alone(_attention(processor=SlicedAttnProcessor(2)), "processor SlicedAttnProcessor")
    check_left_alone(_attention(added_kv_proj_dim=8, norm_num_groups=None), "added KV")
    check_left_alone(_attention(qk_norm="layer_norm"), "norms")


def test_calls_the_fused_path_does_not_compute_run_diffusers_processor():
    layer = _attention(heads=2, dim_head=8).eval()
    fused = fastattn.convert(layer)
    assert isinstance(fused, FusedAttention) and isinstance(fused, Attention)
    tokens = torch.randn(2, 12, 16)
    mask = torch.zeros(2, 1, 12)
    mask[:, :, 5:] = -1e4
    with torch.no_grad(), counting_fused_calls() as calls:
        torch.testing.assert_close(fused(tokens), layer(tokens))                              # 3-D tokens
        torch.testing.assert_close(fused(tokens, attention_mask=mask), layer(tokens, attention_mask=mask))
    assert not calls
    with pytest.raises(RuntimeError):  # diffusers' own error for a map of the wrong width
        fused(torch.randn(2, 8, 4, 4))
    layer.to_out[1].p = 0.5
    fused = fastattn.convert(layer).train()
    with counting_fused_calls() as calls:
        fused(torch.randn(2, 16, 4, 4))
    assert not calls  # dropout after to_out in training: diffusers' processor draws the mask
    with torch.no_grad(), counting_fused_calls() as calls:
        fused.eval()(torch.randn(2, 16, 4, 4))
    assert calls


def test_state_dict_round_trip():
    check_state_dict_round_trip(lambda seed: _attention(seed))


# --------------------------------------------------------------------------
# whole tiny models, with their own initialisation (random weights everywhere make a deep model's
# float32 result chaotic: the eager model's own error then reaches the size of the result)
# --------------------------------------------------------------------------
def _vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         layers_per_block=1, sample_size=16)


def _unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8, layers_per_block=1)


def test_autoencoder_kl_forward_and_train_step():
    x = torch.randn(2, 3, 8, 8)
    vae = _vae()
    check_model(_vae, lambda dtype: (x.to(dtype),), lambda out: out.sample)
    _, report = fastattn.convert(vae, return_report=True)
    assert dict(report.replaced) == {"Attention": 2}, str(report)  # encoder and decoder mid-blocks


def test_unet2d_forward_and_train_step():
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    check_model(_unet, lambda dtype: (x.to(dtype), t), lambda out: out.sample)
    _, report = fastattn.convert(_unet(), return_report=True)
    assert dict(report.replaced) == {"Attention": sum(isinstance(m, Attention) for m in _unet().modules())} == \
        {"Attention": 4}, str(report)  # 1 down, 1 mid, 2 up


def test_set_attn_processor():
    vae = _vae().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = vae(x).sample
        vae.set_attn_processor(FastattnAttnProcessor())
        with counting_fused_calls() as calls:
            got = vae(x).sample
    assert len(calls) == len(vae.attn_processors) == 2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert all(isinstance(p, FastattnAttnProcessor) for p in vae.attn_processors.values())
    # and on a converted model: processors can still be switched, diffusers' way
    converted = fastattn.convert(_vae().eval())
    assert all(isinstance(p, FastattnAttnProcessor) for p in converted.attn_processors.values())
    converted.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad(), counting_fused_calls() as calls:
        torch.testing.assert_close(converted(x).sample, expected, atol=1e-5, rtol=1e-4)
    assert not calls
