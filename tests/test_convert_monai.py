"""fastattn.convert on MONAI's SpatialAttentionBlock (2-D and 3-D), alone and in MONAI's AutoencoderKL."""
import pytest
import torch

pytest.importorskip("monai")
from monai.networks.blocks import SpatialAttentionBlock  # noqa: E402
from monai.networks.nets import AutoencoderKL  # noqa: E402

from _convert_parity import GPU_BACKENDS, check_layer, check_left_alone, check_model, check_same_error, \
    check_state_dict_round_trip, randomize_  # noqa: E402


def _block(spatial_dims=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_(SpatialAttentionBlock(spatial_dims, 16, **{"num_head_channels": 8, "norm_num_groups": 8,
                                                                  **kwargs}), seed)


@pytest.mark.parametrize("size", [(13, 17), (7, 7), (1, 1)])
def test_2d(size):
    check_layer(_block(), "SpatialAttentionBlock", (2, 16, *size))


@pytest.mark.parametrize("kwargs, shape", [
    ({}, (2, 16, 3, 5, 4)),
    (dict(use_combined_linear=True), (1, 16, 2, 3, 5)),
    (dict(num_head_channels=None, include_fc=False), (2, 16, 3, 3, 3)),
    (dict(use_flash_attention=True), (2, 16, 2, 2, 3)),
])
def test_3d(kwargs, shape):
    check_layer(_block(3, **kwargs), "SpatialAttentionBlock", shape)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_on_gpu(backend):
    check_layer(_block(), "SpatialAttentionBlock", (2, 16, 13, 17), device="cuda", backend=backend)
    check_layer(_block(3, use_combined_linear=True), "SpatialAttentionBlock", (1, 16, 2, 3, 5), device="cuda",
                backend=backend)


def test_left_alone_and_errors():
    check_left_alone(_block(attention_dtype=torch.float32), "attention_dtype")
    check_same_error(_block().eval(), torch.randn(2, 8, 4, 4))


def test_state_dict_round_trip():
    check_state_dict_round_trip(lambda seed: _block(3, seed=seed))


class _Reconstruct(torch.nn.Module):
    """AutoencoderKL.reconstruct (encode to the mean, decode): its forward samples the latent."""

    def __init__(self, autoencoder):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x):
        return self.autoencoder.reconstruct(x)


def _autoencoder():
    torch.manual_seed(0)
    return _Reconstruct(AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), latent_channels=3,
                         num_res_blocks=1, norm_num_groups=4, attention_levels=(False, True)))


def test_autoencoder_kl_forward_and_train_step():
    x = torch.randn(2, 1, 12, 10)
    check_model(_autoencoder, lambda dtype: (x.to(dtype),))
