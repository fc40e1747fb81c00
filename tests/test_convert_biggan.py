"""fastattn.convert on BigGAN's SelfAttn (pytorch_pretrained_biggan), alone and in a small generator."""
import pytest
import torch

pytest.importorskip("pytorch_pretrained_biggan")
from pytorch_pretrained_biggan import BigGAN, BigGANConfig  # noqa: E402
from pytorch_pretrained_biggan.model import SelfAttn  # noqa: E402

from _convert_parity import GPU_BACKENDS, check_layer, check_model, check_same_error, check_state_dict_round_trip, \
    randomize_  # noqa: E402


def _attn(seed=0, channels=32):
    torch.manual_seed(seed)
    layer = randomize_(SelfAttn(channels), seed)
    with torch.no_grad():  # a trained layer's spectral norms: power iteration converged, not at its random start
        for _ in range(20):
            layer(torch.randn(2, channels, 4, 4))
    return layer


# 4x4 and up: at 2x2 the pooled map has one key, where eager's softmax backward gives exactly zero q and k
# gradients and a flash-style backward (rowsum(dO * O) for the softmax term) their float32 rounding
@pytest.mark.parametrize("size", [(14, 18), (6, 10), (4, 4)])
def test_selfattn(size):
    check_layer(_attn(), "SelfAttn", (2, 32, *size))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_on_gpu(backend):
    check_layer(_attn(), "SelfAttn", (2, 32, 14, 18), device="cuda", backend=backend)


@pytest.mark.parametrize("size", [(13, 17), (7, 7), (1, 1)])
def test_odd_sizes_behave_as_the_original(size):
    """Its forward views the pooled map as h*w//4 positions: with odd sizes it raises (or, where
    the element counts happen to fit, mixes batches): the converted layer runs it as it is."""
    check_same_error(_attn().eval(), torch.randn(2, 32, *size))


def test_state_dict_round_trip():
    check_state_dict_round_trip(lambda seed: _attn(seed))


def _generator():
    torch.manual_seed(0)
    # the generator's input map has 16 * channel_width channels, each block halves them or keeps them;
    # SelfAttn(16) runs at 8x8
    config = BigGANConfig(output_dim=64, z_dim=16, class_embed_dim=16, channel_width=2, num_classes=10,
                          layers=[(False, 16, 16), (True, 16, 8), (True, 8, 4), (True, 4, 2), (True, 2, 1)],
                          attention_layer_position=2, n_stats=3)
    model = BigGAN(config)
    with torch.no_grad():  # gamma starts at zero: give the attention a say
        model.generator.layers[2].gamma.fill_(0.5)
    return model


def test_generator_forward_and_train_step():
    g = torch.Generator().manual_seed(1)
    z, label = torch.randn(2, 16, generator=g), torch.eye(10)[[3, 7]]
    check_model(_generator, lambda dtype: (z.to(dtype), label.to(dtype), 0.5))
