"""fastattn.convert on users' copies of the official CBAM and of Non-local_pytorch's block
(tests/_user_copies.py), matched by structure and proven on a float64 probe."""
import pytest
import torch
from torch import nn

import fastattn
import _user_copies as user
from _convert_parity import GPU_BACKENDS, check_float16_key_bias_deviation, check_layer, check_left_alone, \
    check_state_dict_round_trip, randomize_

SIZES = [(13, 17), (7, 7), (1, 1)]


def _cbam(seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_(user.CBAM(32, reduction_ratio=4, **kwargs), seed)


def _nonlocal(block=user.NONLocalBlock2D, seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_(block(16, **kwargs), seed)


@pytest.mark.parametrize("size", SIZES)
def test_official_cbam_copy(size):
    check_layer(_cbam(), "CBAM", (2, 32, *size))


def test_official_cbam_copy_no_spatial():
    check_layer(_cbam(no_spatial=True), "CBAM", (2, 32, 7, 5))


def test_nonlocal_copy_subsampled_keys():
    check_layer(_nonlocal(), "NONLocalBlock2D", (2, 16, 13, 17), dtypes=("float32", "bfloat16"))
    check_float16_key_bias_deviation(_nonlocal(), "NONLocalBlock2D", (2, 16, 13, 17), "phi.0.bias")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_on_gpu(backend):
    check_layer(_cbam(), "CBAM", (2, 32, 13, 17), device="cuda", backend=backend)
    check_layer(_nonlocal(sub_sample=False), "NONLocalBlock2D", (2, 16, 13, 17), device="cuda", backend=backend)


@pytest.mark.parametrize("block, spatial, kwargs", [
    (user.NONLocalBlock2D, (7, 7), dict(sub_sample=False, bn_layer=False)),
    (user.NONLocalBlock2D, (1, 1), dict(sub_sample=False)),
    (user.NONLocalBlock2D, (6, 9), dict(mode="gaussian")),
    (user.NONLocalBlock1D, (11,), {}),
    (user.NONLocalBlock3D, (3, 6, 5), {}),
])
def test_nonlocal_copy(block, spatial, kwargs):
    check_layer(_nonlocal(block, **kwargs), "NONLocalBlock%dD" % len(spatial), (2, 16, *spatial))


@pytest.mark.parametrize("pool_types", [["avg", "max", "lp"], ["avg", "lse"]])
def test_cbam_other_pool_types_left_alone(pool_types):
    check_left_alone(_cbam(pool_types=pool_types), "pool types")


def test_lookalikes_left_alone_with_the_probe_reason():
    # same structure as the embedded-Gaussian block, but f / N instead of a softmax
    check_left_alone(_nonlocal(mode="dot_product"), "differs from the fused computation on a float64 probe")

    class SwappedPools(user.ChannelPool):  # cat[mean, max]: the official block's structure, another formula
        def forward(self, x):
            return super().forward(x).flip(1)
    cbam = _cbam()
    cbam.SpatialGate.compress = SwappedPools()
    check_left_alone(cbam, "float64 probe")


def test_probe_leaves_the_model_untouched_and_report_lists_both():
    model = nn.Sequential(_cbam(), _nonlocal(), _nonlocal(mode="dot_product"))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused, report = fastattn.convert(model, return_report=True)
    assert dict(report.replaced) == {"CBAM": 1, "NONLocalBlock2D": 1}, str(report)
    assert [path for path, _, _ in report.skipped] == ["2"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(fused[0], fastattn.nn.CBAM) and type(fused[2]) is user.NONLocalBlock2D


@pytest.mark.parametrize("make", [_cbam, lambda seed: _nonlocal(seed=seed)])
def test_state_dict_round_trip(make):
    check_state_dict_round_trip(make)


def test_return_nl_map_runs_the_copy():
    block = _nonlocal().eval()
    fused = fastattn.convert(block)
    x = torch.randn(2, 16, 6, 6)
    z, nl_map = fused(x, return_nl_map=True)
    z_ref, map_ref = block(x, return_nl_map=True)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(nl_map, map_ref)
    with pytest.raises(RuntimeError):  # the copy's own error for a map of the wrong channels
        fused(torch.randn(2, 8, 6, 6))
