"""What the library integrations share: one converted model holding a layer of each library under
torch.compile(fullgraph=True), and the report."""
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("mmcv")
pytest.importorskip("monai")
pytest.importorskip("pytorch_pretrained_biggan")
from diffusers.models.attention_processor import Attention  # noqa: E402
from mmcv.cnn import NonLocal2d  # noqa: E402
from monai.networks.blocks import SpatialAttentionBlock  # noqa: E402
from pytorch_pretrained_biggan.model import SelfAttn  # noqa: E402

import fastattn  # noqa: E402
import _user_copies as user  # noqa: E402
from _convert_parity import randomize_  # noqa: E402


def _model():
    torch.manual_seed(0)
    return randomize_(nn.Sequential(
        Attention(16, heads=2, dim_head=8, norm_num_groups=8, residual_connection=True, bias=True,
                  _from_deprecated_attn_block=True),
        NonLocal2d(16, sub_sample=True), SpatialAttentionBlock(2, 16, num_head_channels=8, norm_num_groups=8),
        SelfAttn(16), user.CBAM(16, reduction_ratio=4), user.NONLocalBlock2D(16),
        NonLocal2d(16, mode="dot_product"), Attention(16, cross_attention_dim=8, _from_deprecated_attn_block=True)))


def test_report_lists_replaced_and_left_alone():
    fused, report = fastattn.convert(_model(), return_report=True)
    assert dict(report.replaced) == {"Attention": 1, "NonLocal2d": 1, "SpatialAttentionBlock": 1, "SelfAttn": 1,
                                     "CBAM": 1, "NONLocalBlock2D": 1}, str(report)
    skipped = {path: (name, reason) for path, name, reason in report.skipped}
    assert skipped.keys() == {"6", "7"}
    assert "dot_product" in skipped["6"][1] and "cross-attention" in skipped["7"][1]
    text = str(report)
    assert "replaced 6 layer(s)" in text and "left alone 2 layer(s)" in text
    again, report = fastattn.convert(fused, return_report=True)  # idempotent: fused layers are not matched again
    assert not report.replaced and len(report.skipped) == 2, str(report)
    assert [type(m) for m in again] == [type(m) for m in fused]


def test_compile_fullgraph_no_graph_break():
    model = fastattn.convert(_model()[:6])
    x = torch.randn(2, 16, 8, 8)
    for train in (True, False):
        model.train(train)
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
    # train forward + backward through AOTAutograd (aot_eager: Inductor's code generation costs minutes
    # here), on twins: a training call moves BN statistics and spectral norm's vectors
    eager, twin = (fastattn.convert(_model()[:6]).train() for _ in range(2))
    results = []
    for module, run in ((eager, eager), (twin, torch.compile(twin, fullgraph=True, backend="aot_eager"))):
        x_in = x.clone().requires_grad_(True)
        y = run(x_in)
        y.square().mean().backward()
        results.append((y, x_in.grad, [p.grad for p in module.parameters()], list(module.buffers())))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)
