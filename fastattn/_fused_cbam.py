"""The whole CBAM block as one autograd.Function over the fused kernels.

Memory traffic, counted in passes over x-sized tensors (N*C*H*W elements):

forward   channel_pool        reads x                          1 read
          gated_spatial_pool  reads x (x*gate never written)   1 read
          cbam_apply          reads x, writes y                1 read, 1 write
          -> x read 3 times, y written once.
backward  cbam_apply_backward reads dy and x                   2 reads
          gated_spatial_pool_backward_gate reads x             1 read
          cbam_grad_x         reads dy, writes dx              1 read, 1 write
                              (and x: cuda, triton; cpu where
                              a tie of the split rule needs it)
          -> 4 reads (cpu; 5 on cuda and triton), dx written once.
At inference on the cpu backend (no gradient wanted, BatchNorm on its running
statistics) the whole block is one op, cbam_forward_eval, in two passes:
inference  channel pool                                       1 read
           per row band: spatial pool, gate, apply            1 read, 1 write
                         (the band's rows re-read from L2)
          -> x read twice, y written once; see inference_forward. Where the
             MLP is small, each image is pooled right before its band walk, so
             the second read finds it in cache (DESIGN.md §7).

Saved for backward: x, the two gates, the pooled map and the small index and
tie-count tensors (N*C and N*H*W); not y and not x*ch_gate. The tie counts
come from the forward, so timm's split-ties rule costs no extra read.

The small parts (the shared MLP on (N, C) vectors, the k*k conv + BatchNorm +
sigmoid on (N, 2, H, W)) are ordinary PyTorch ops; their backward is written
out here so the block stays a single traceable Function (torch.compile
fullgraph) with one x-sized gradient pass. The one exception is the conv on the
cpu backend: fastattn's direct kernel (cbam_spatial_conv and its weight
gradient), because oneDNN's set-up for a 1- or 2-channel map costs more than
its few MFLOP (measured in docs/benchmarks.md, "Measurements behind design choices").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn._ops import ChannelMaxTerm, OutputTerm, SpatialPoolTerm, cbam_grad_x, kernels_for
from fastattn._layout import memory_format


@dataclass(frozen=True)
class CbamSpec:
    """What distinguishes the CBAM flavours, all python constants."""
    light: bool                 # timm Light*: one MLP on 0.5*avg + 0.5*max; conv on 0.5*mean + 0.5*max
    max_first: bool             # official: spatial conv input is cat[max, mean]
    split_ties: bool            # timm amax (split) vs official max_pool2d / torch.max (first index)
    no_spatial: bool
    padding: tuple[int, int]
    bn_eps: float
    bn_batch_stats: bool        # BatchNorm normalises with batch statistics (training or no running stats)
    backend: str
    op_backends: tuple[tuple[str, str], ...] = ()  # (op, backend) where auto picks op by op (on a GPU)


def _kernel(spec: CbamSpec, op: str):
    """The kernel of `op`: its own backend where spec.op_backends names one, else spec.backend's."""
    return getattr(kernels_for(dict(spec.op_backends).get(op, spec.backend)), op)


def _mlp_forward(v: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None):
    hidden = torch.relu(F.linear(v, w1.flatten(1), b1))
    return F.linear(hidden, w2.flatten(1), b2), hidden


def _batch_stats(t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Biased variance and mean of each channel of t over (N, H, W), in two passes at float32 or
    wider (on these one-channel maps faster than torch.var_mean's Welford kernel), in `dtype`: the
    running statistics' (float32 under autocast, where t is 16-bit)."""
    wide = t.to(torch.promote_types(t.dtype, torch.float32))
    mean = wide.mean(dim=(0, 2, 3), keepdim=True)
    var = (wide - mean).square().mean(dim=(0, 2, 3))
    return var.to(dtype), mean.flatten().to(dtype)


def _spatial_input(pooled: Tensor, spec: CbamSpec) -> Tensor:
    if spec.light:
        return 0.5 * pooled[:, 0:1] + 0.5 * pooled[:, 1:2]
    return pooled.flip(1) if spec.max_first else pooled


def _spatial_input_backward(d_in: Tensor, spec: CbamSpec) -> Tensor:
    if spec.light:
        return (0.5 * d_in).expand(-1, 2, -1, -1).contiguous()
    return d_in.flip(1).contiguous() if spec.max_first else d_in.contiguous()


class FusedCBAMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, conv_w, bn_w, bn_b, bn_mean, bn_var, spec: CbamSpec):
        n, c, h, w = x.shape
        avg, mx, ch_argmax, ch_count = _kernel(spec, "channel_pool")(x, spec.split_ties)
        mlp_in = 0.5 * avg + 0.5 * mx if spec.light else torch.cat([avg, mx])
        mlp_out, hidden = _mlp_forward(mlp_in, w1, b1, w2, b2)
        pre = mlp_out if spec.light else mlp_out[:n] + mlp_out[n:]
        ch_gate = torch.sigmoid(pre)

        if spec.no_spatial:
            sp_gate = x.new_ones(n, h, w)
            pooled = sp_in = conv_out = sp_argmax = sp_count = save_mean = save_invstd = None
            stat_mean = stat_var = x.new_empty(0)
        else:
            pooled, sp_argmax, sp_count = _kernel(spec, "gated_spatial_pool")(x, ch_gate, spec.split_ties)
            sp_in = _spatial_input(pooled, spec)
            conv_out = _conv(sp_in, conv_w, spec.padding, spec.backend)
            # PyTorch's own BatchNorm kernels, forward and backward: the same numbers as eager
            normed, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
                conv_out, bn_w, bn_b, None if spec.bn_batch_stats else bn_mean,
                None if spec.bn_batch_stats else bn_var, spec.bn_batch_stats, 0.0, spec.bn_eps)
            # batch statistics for the running-statistics update (empty when BN uses its running ones;
            # tensors, not None, so that torch.compile traces one graph)
            stat_var, stat_mean = (_batch_stats(conv_out, conv_out.dtype if bn_mean is None else bn_mean.dtype)
                                   if spec.bn_batch_stats
                                   else (conv_out.new_empty(0), conv_out.new_empty(0)))
            sp_gate = torch.sigmoid(normed).view(n, h, w)

        y = _kernel(spec, "cbam_apply")(x, ch_gate, sp_gate)
        ctx.spec = spec
        if spec.bn_batch_stats:  # the running statistics are updated in place after this; backward needs none
            bn_mean = bn_var = None
        ctx.save_for_backward(x, w1, b1, w2, conv_w, bn_w, bn_mean, bn_var, mlp_in, hidden, ch_gate, mx, ch_argmax,
                              ch_count, sp_gate, pooled, sp_argmax, sp_count, sp_in, conv_out, save_mean, save_invstd)
        ctx.mark_non_differentiable(stat_mean, stat_var)
        return y, stat_mean, stat_var

    @staticmethod
    def backward(ctx, dy, _d_mean, _d_var):
        spec: CbamSpec = ctx.spec
        (x, w1, b1, w2, conv_w, bn_w, bn_mean, bn_var, mlp_in, hidden, ch_gate, mx, ch_argmax, ch_count,
         sp_gate, pooled, sp_argmax, sp_count, sp_in, conv_out, save_mean, save_invstd) = ctx.saved_tensors
        n = x.shape[0]
        dy = dy.contiguous(memory_format=memory_format(x))
        d_ch_gate, d_sp_gate = _kernel(spec, "cbam_apply_backward")(dy, x, ch_gate, sp_gate)

        d_conv_w = d_bn_w = d_bn_b = d_pooled = None
        if not spec.no_spatial:
            # sigmoid -> BatchNorm -> conv, backwards
            d_normed = torch.ops.aten.sigmoid_backward(d_sp_gate, sp_gate).view(n, 1, *x.shape[2:])
            d_conv, d_bn_w, d_bn_b = torch.ops.aten.native_batch_norm_backward(
                d_normed, conv_out, bn_w, bn_mean, bn_var, save_mean, save_invstd, spec.bn_batch_stats,
                spec.bn_eps, [True, bn_w is not None, bn_w is not None])
            d_sp_in = _conv_input_grad(d_conv, conv_w, spec.padding, spec.backend)
            d_conv_w = None
            if ctx.needs_input_grad[5]:
                d_conv_w = _conv_weight_grad(d_conv, sp_in, conv_w, spec.padding, spec.backend)
            d_pooled = _spatial_input_backward(d_sp_in, spec)
            d_ch_gate = d_ch_gate + _kernel(spec, "gated_spatial_pool_backward_gate")(
                d_pooled, x, ch_gate, pooled, sp_argmax, sp_count, spec.split_ties)

        # sigmoid -> shared MLP, backwards
        d_pre = torch.ops.aten.sigmoid_backward(d_ch_gate, ch_gate)
        d_mlp_out = d_pre if spec.light else torch.cat([d_pre, d_pre])
        d_w2 = (d_mlp_out.t() @ hidden).view_as(w2)
        d_b2 = d_mlp_out.sum(0)
        d_hidden = torch.ops.aten.threshold_backward(d_mlp_out @ w2.flatten(1), hidden, 0)  # hidden is ReLU'd
        d_w1 = (d_hidden.t() @ mlp_in).view_as(w1)
        d_b1 = d_hidden.sum(0) if b1 is not None else None
        d_mlp_in = d_hidden @ w1.flatten(1)
        if spec.light:
            d_avg = d_max = 0.5 * d_mlp_in
        else:
            d_avg, d_max = d_mlp_in[:n], d_mlp_in[n:]

        dx = None
        if ctx.needs_input_grad[0]:
            dx = cbam_grad_x(_kernel(spec, "cbam_grad_x"), x, output=OutputTerm(dy, ch_gate, sp_gate),
                             spatial_pool=None if spec.no_spatial else SpatialPoolTerm(d_pooled, ch_gate, pooled,
                                                                                       sp_argmax, sp_count),
                             grad_avg=d_avg.contiguous(),
                             channel_max=ChannelMaxTerm(d_max.contiguous(), mx, ch_argmax, ch_count),
                             split_ties=spec.split_ties)
        return (dx, d_w1, d_b1, d_w2, d_b2 if ctx.needs_input_grad[4] else None, d_conv_w,
                d_bn_w, d_bn_b, None, None, None)


def inference_forward(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                      conv_w: Tensor | None, bn_w: Tensor | None, bn_b: Tensor | None, bn_mean: Tensor | None,
                      bn_var: Tensor | None, spec: CbamSpec, inplace: bool = False) -> Tensor:
    """The block's forward as the single cpu op cbam_forward_eval, for calls that need no gradient with
    BatchNorm on its running statistics: no images are coupled, so the spatial gate is made band by
    band of rows and applied while the band is in cache (x read twice, against three times).

    The MLP's Linear layers are the same PyTorch ops as on the training path (relu, the sum and the
    sigmoid are loops in the op); BatchNorm is folded into one scale and shift as PyTorch's CPU
    kernel folds it. The two paths agree up to the last bits of the BatchNorm and sigmoid arithmetic
    (tests/test_cbam_modules.py).

    inplace: y written over x by cbam_forward_eval_ and x returned, when x is contiguous or
    channels_last (the op writes no other strides); else y out of place, for the caller to copy.
    """
    if inplace and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        torch.ops.fastattn.cbam_forward_eval_(x, w1, b1, w2, b2, conv_w, bn_w, bn_b, bn_mean, bn_var, spec.bn_eps,
                                              list(spec.padding), spec.light, spec.max_first)
        return x
    return torch.ops.fastattn.cbam_forward_eval(x, w1, b1, w2, b2, conv_w, bn_w, bn_b, bn_mean, bn_var, spec.bn_eps,
                                                list(spec.padding), spec.light, spec.max_first)


def _conv(x: Tensor, weight: Tensor, padding: tuple[int, int], backend: str) -> Tensor:
    """F.conv2d(x, weight, None, 1, padding); on the cpu backend fastattn's direct kernel, since oneDNN's
    set-up costs more than the few MFLOP of a 1- or 2-channel map."""
    if backend == "cpu":
        return torch.ops.fastattn.cbam_spatial_conv(x, weight, list(padding))
    return F.conv2d(x, weight, None, 1, padding)


def _conv_weight_grad(d_out: Tensor, x: Tensor, weight: Tensor, padding: tuple[int, int], backend: str) -> Tensor:
    if backend == "cpu":
        return torch.ops.fastattn.cbam_spatial_conv_weight_grad(d_out, x, weight.shape[2], weight.shape[3],
                                                                list(padding))
    return torch.ops.aten.convolution_backward(d_out, x, weight, None, [1, 1], list(padding), [1, 1], False,
                                               [0, 0], 1, [False, True, False])[1]


def _conv_input_grad(d_out: Tensor, weight: Tensor, padding: tuple[int, int], backend: str) -> Tensor:
    """Input gradient of a stride-1 conv as a conv with the flipped, transposed kernel: on the CPU
    the transposed-conv path PyTorch takes for one output channel is several times slower."""
    kh, kw = weight.shape[2:]
    pad = (kh - 1 - padding[0], kw - 1 - padding[1])
    if min(pad) < 0:
        return torch.ops.aten.convolution_backward(d_out, d_out.new_empty(0), weight, None, [1, 1], list(padding),
                                                   [1, 1], False, [0, 0], 1, [True, False, False])[0]
    return _conv(d_out, weight.flip(2, 3).transpose(0, 1), pad, backend)
