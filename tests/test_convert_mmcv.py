"""fastattn.convert on mmcv's NonLocal1d/2d/3d (mmcv.cnn, as mmdet, mmseg and mmaction2 use it)."""
import pytest
import torch
from torch import nn

pytest.importorskip("mmcv")
from mmcv.cnn import ConvModule, NonLocal1d, NonLocal2d, NonLocal3d  # noqa: E402

import fastattn  # noqa: E402
from fastattn.integrations.mmcv import _one_conv_projections  # noqa: E402
from _convert_parity import GPU_BACKENDS, check_float16_key_bias_deviation, check_layer, check_left_alone, \
    check_model, check_same_error, check_state_dict_round_trip, randomize_  # noqa: E402


def _nl(cls=NonLocal2d, seed=0, channels=16, **kwargs):
    torch.manual_seed(seed)
    return randomize_(cls(channels, **kwargs), seed)


@pytest.mark.parametrize("size", [(13, 17), (7, 7), (1, 1)])
def test_nonlocal2d_embedded_gaussian(size):
    check_layer(_nl(norm_cfg=dict(type="BN")), "NonLocal2d", (2, 16, *size))


def test_nonlocal2d_subsampled_keys():
    layer = _nl(sub_sample=True, norm_cfg=dict(type="BN"))
    check_layer(layer, "NonLocal2d", (2, 16, 7, 9), dtypes=("float32", "bfloat16"))
    check_float16_key_bias_deviation(layer, "NonLocal2d", (2, 16, 7, 9), "phi.0.conv.bias")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_on_gpu(backend):
    check_layer(_nl(norm_cfg=dict(type="BN")), "NonLocal2d", (2, 16, 13, 17), device="cuda", backend=backend)
    check_layer(_nl(NonLocal3d, sub_sample=True), "NonLocal3d", (2, 16, 3, 6, 5), device="cuda", backend=backend)


@pytest.mark.parametrize("cls, shape, kwargs", [
    (NonLocal2d, (2, 16, 5, 6), dict(use_scale=False)),
    (NonLocal2d, (2, 16, 6, 7), dict(mode="gaussian", sub_sample=True)),
    (NonLocal1d, (2, 16, 11), dict(sub_sample=True)),
    (NonLocal3d, (2, 16, 3, 6, 5), dict(sub_sample=True, norm_cfg=dict(type="BN3d"))),
    (NonLocal3d, (1, 16, 2, 3, 3), dict(mode="gaussian")),
])
def test_nonlocal_configurations(cls, shape, kwargs):
    check_layer(_nl(cls, **kwargs), cls.__name__, shape)


def test_stacked_projections_only_where_they_compute_the_same():
    """theta, phi and g run as one stacked conv only as bare convs without sub-sampling; a hook on one of
    them (spectral norm, a user's pre-hook) makes the fused path call them as they are."""
    assert _one_conv_projections(fastattn.convert(_nl()))
    assert not _one_conv_projections(fastattn.convert(_nl(sub_sample=True)))
    layer = _nl()
    layer.phi.conv.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    assert not _one_conv_projections(fastattn.convert(layer))
    check_layer(layer, "NonLocal2d", (2, 16, 5, 6), dtypes=("float32",))


@pytest.mark.parametrize("mode", ["dot_product", "concatenation"])
def test_modes_without_softmax_left_alone(mode):
    check_left_alone(_nl(mode=mode), "has no softmax attention")


def test_bad_input_raises_mmcv_error():
    check_same_error(_nl(sub_sample=True).eval(), torch.randn(2, 16, 1, 1))   # 2x2 pool of a 1x1 map
    check_same_error(_nl().eval(), torch.randn(2, 8, 5, 5))                   # wrong channels
    check_same_error(_nl().eval(), torch.randn(16, 5, 5))                     # wrong rank


def test_state_dict_round_trip():
    check_state_dict_round_trip(lambda seed: _nl(seed=seed, sub_sample=True, norm_cfg=dict(type="BN")))


def _backbone():
    """A small segmentation-style backbone with an NLNet head (mmseg's NLHead puts a NonLocal2d between
    two ConvModules)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        ConvModule(3, 16, 3, padding=1, norm_cfg=dict(type="BN")), ConvModule(16, 32, 3, stride=2, padding=1,
                                                                              norm_cfg=dict(type="BN")),
        ConvModule(32, 16, 3, padding=1, norm_cfg=dict(type="BN")),
        NonLocal2d(16, reduction=2, use_scale=True, norm_cfg=dict(type="BN"), mode="embedded_gaussian"),
        ConvModule(16, 16, 3, padding=1, norm_cfg=dict(type="BN")), nn.Conv2d(16, 5, 1))
    with torch.no_grad():  # conv_out's norm starts at zero (the block an identity): give the attention a say
        model[3].conv_out.norm.weight.fill_(0.5)
    return model


def test_backbone_forward_and_train_step():
    x = torch.randn(2, 3, 18, 14)
    check_model(_backbone, lambda dtype: (x.to(dtype),))
