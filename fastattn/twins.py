"""Eager twins of the attention layers fastattn fuses, written as their authors wrote them.

* the two CBAM flavours: the official one (Jongchan/attention-module: ``OfficialCBAM`` and its
  gates) and timm's (``TimmCBAM``: timm.layers.cbam.CbamModule / LightCbamModule, same keys);
* spatial-attention blocks the eager bmm-softmax-bmm way of their papers' code: ``NonLocal2d``,
  ``SelfAttention2d`` (SAGAN / BigGAN), ``AttentionBlock2d`` (diffusion U-Nets and VAEs) and
  ``TimmNonLocalAttn`` (timm.layers.non_local_attn.NonLocalAttn).

fastattn.nn holds fused twins with the same submodules (its modules build their parameters
from these), and fastattn.convert swaps these for them. The tests compare the fused modules
with these. fastattn.reference re-exports them for code that imports them from there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------
# CBAM, official and timm
# --------------------------------------------------------------------------
def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm.layers.make_divisible: round channels to a multiple of divisor."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class BasicConv(nn.Module):
    """Official CBAM's conv + BN (momentum 0.01) + optional ReLU."""

    def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0, relu=True, bn=True, bias=False):
        super().__init__()
        self.out_channels = out_planes
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride=stride, padding=padding, bias=bias)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class OfficialChannelGate(nn.Module):
    """Jongchan/attention-module ChannelGate (avg + max pools, Linear MLP with biases)."""

    def __init__(self, gate_channels, reduction_ratio=16):
        super().__init__()
        self.gate_channels = gate_channels
        self.mlp = nn.Sequential(Flatten(), nn.Linear(gate_channels, gate_channels // reduction_ratio), nn.ReLU(),
                                 nn.Linear(gate_channels // reduction_ratio, gate_channels))

    def forward(self, x):
        size = (x.size(2), x.size(3))
        att = self.mlp(F.avg_pool2d(x, size, stride=size)) + self.mlp(F.max_pool2d(x, size, stride=size))
        return x * torch.sigmoid(att).unsqueeze(2).unsqueeze(3).expand_as(x)


class ChannelPool(nn.Module):
    def forward(self, x):
        return torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)


class OfficialSpatialGate(nn.Module):
    """Jongchan/attention-module SpatialGate: cat[max, mean] -> 7x7 conv -> BN -> sigmoid."""

    def __init__(self, kernel_size=7):
        super().__init__()
        self.compress = ChannelPool()
        self.spatial = BasicConv(2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2, relu=False)

    def forward(self, x):
        return x * torch.sigmoid(self.spatial(self.compress(x)))


class OfficialCBAM(nn.Module):
    """Jongchan/attention-module CBAM; its checkpoints load as they are."""

    def __init__(self, gate_channels, reduction_ratio=16, no_spatial=False, kernel_size=7):
        super().__init__()
        self.ChannelGate = OfficialChannelGate(gate_channels, reduction_ratio)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = OfficialSpatialGate(kernel_size)

    def forward(self, x):
        x_out = self.ChannelGate(x)
        if not self.no_spatial:
            x_out = self.SpatialGate(x_out)
        return x_out


class ConvBN(nn.Module):
    """timm's ConvNormAct(apply_act=False) layout: .conv, .bn."""

    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return self.bn(self.conv(x))


class TimmChannelAttn(nn.Module):
    """timm.layers.cbam.ChannelAttn (light=False) / LightChannelAttn (light=True)."""

    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=1, mlp_bias=False, light=False):
        super().__init__()
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.light = light
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        if self.light:
            pool = 0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True)
            return x * self.gate(self.fc2(self.act(self.fc1(pool))))
        x_avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        x_max = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * self.gate(x_avg + x_max)


class TimmSpatialAttn(nn.Module):
    """timm.layers.cbam.SpatialAttn (light=False) / LightSpatialAttn (light=True)."""

    def __init__(self, kernel_size=7, light=False):
        super().__init__()
        self.light = light
        self.conv = ConvBN(1 if light else 2, 1, kernel_size)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        if self.light:
            attn = 0.5 * x.mean(dim=1, keepdim=True) + 0.5 * x.amax(dim=1, keepdim=True)
        else:
            attn = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * self.gate(self.conv(attn))


class TimmCBAM(nn.Module):
    """timm.layers.cbam.CbamModule (light=False) / LightCbamModule (light=True); same state_dict keys."""

    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=1, spatial_kernel_size=7,
                 mlp_bias=False, light=False):
        super().__init__()
        self.channel = TimmChannelAttn(channels, rd_ratio, rd_channels, rd_divisor, mlp_bias, light)
        self.spatial = TimmSpatialAttn(spatial_kernel_size, light)

    def forward(self, x):
        return self.spatial(self.channel(x))


# --------------------------------------------------------------------------
# Spatial-attention blocks, written the eager bmm-softmax-bmm way of their papers' code
# --------------------------------------------------------------------------
class NonLocal2d(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al., CVPR 2018).

    x: (N, C, H, W) -> x + BN(out_conv(y)), where with Ci = inter_channels
    theta(x): (N, Ci, L), phi(x), g(x): (N, Ci, Lk) (Lk = L, or L/4 with sub_sample),
    y[:, :, i] = sum_j softmax_j(scale * theta_i . phi_j) g_j  -> (N, Ci, H, W).
    scale = Ci ** -0.5 with use_scale (video-nonlocal-net, mmcv), else 1.0 (the paper).
    The BN's weight and bias start at zero, so a new block is the identity.
    """

    def __init__(self, channels: int, reduction: int = 2, *, inter_channels: int | None = None,
                 sub_sample: bool = False, use_scale: bool = True):
        super().__init__()
        inter = inter_channels or max(channels // reduction, 1)
        self.channels, self.inter_channels = channels, inter
        self.sub_sample, self.use_scale = sub_sample, use_scale
        self.scale = inter ** -0.5 if use_scale else 1.0
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.g = nn.Conv2d(channels, inter, 1)
        self.pool = nn.MaxPool2d(2) if sub_sample else nn.Identity()
        self.out_conv = nn.Conv2d(inter, channels, 1)
        self.out_norm = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.out_norm.weight)
        nn.init.zeros_(self.out_norm.bias)

    def forward(self, x):
        n, _, h, w = x.shape
        theta = self.theta(x).flatten(2)                      # (N, Ci, L)
        phi = self.pool(self.phi(x)).flatten(2)               # (N, Ci, Lk)
        g = self.pool(self.g(x)).flatten(2)                   # (N, Ci, Lk)
        attn = torch.softmax(torch.bmm(theta.transpose(1, 2), phi) * self.scale, -1)  # (N, L, Lk)
        y = torch.bmm(g, attn.transpose(1, 2)).view(n, g.shape[1], h, w)
        return x + self.out_norm(self.out_conv(y))


class SelfAttention2d(nn.Module):
    """SAGAN / BigGAN self-attention, as in BigGAN-PyTorch's `Attention` (keys theta, phi, g, o, gamma).

    x: (N, C, H, W), H and W at least 2 -> x + gamma * o(y), with
    theta(x): (N, C/8, L); phi(x): (N, C/8, L/4) and g(x): (N, C/2, L/4), both 2x2 max-pooled;
    y[:, :, i] = sum_j softmax_j(theta_i . phi_j) g_j (no scaling) -> (N, C/2, H, W).
    gamma starts at 0, so a new block is the identity.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels < 8:
            raise ValueError(f"SelfAttention2d needs channels >= 8 (q and k have channels // 8), got {channels}")
        self.channels = channels
        self.theta = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.phi = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.g = nn.Conv2d(channels, channels // 2, 1, bias=False)
        self.o = nn.Conv2d(channels // 2, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        n, _, h, w = x.shape
        theta = self.theta(x).flatten(2)                      # (N, C/8, L)
        phi = F.max_pool2d(self.phi(x), [2, 2]).flatten(2)    # (N, C/8, L/4)
        g = F.max_pool2d(self.g(x), [2, 2]).flatten(2)        # (N, C/2, L/4)
        beta = torch.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(n, g.shape[1], h, w))
        return self.gamma * o + x


QKV_LAYOUTS = ("chunked", "per_head")


class AttentionBlock2d(nn.Module):
    """Attention block of diffusion U-Nets and VAEs (guided-diffusion's AttentionBlock on 2-D maps).

    x: (N, C, H, W) -> x + proj_out(attention(qkv(norm(x)))), where norm is GroupNorm,
    qkv a 1x1 conv C -> 3C, attention multi-head softmax(d**-0.5 q^T k) v over the H*W
    positions with d = C / heads, and proj_out a 1x1 conv C -> C initialised to zero.
    qkv_layout: how the 3C channels of qkv are ordered:
      "chunked"   [q | k | v], each split into heads (guided-diffusion QKVAttention);
      "per_head"  [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (QKVAttentionLegacy, the DDPM checkpoints).
    """

    def __init__(self, channels: int, heads: int = 1, *, groups: int = 32, eps: float = 1e-5,
                 qkv_layout: str = "chunked"):
        super().__init__()
        if heads < 1 or channels % heads:
            raise ValueError(f"heads={heads} must be positive and divide channels={channels}")
        if qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"qkv_layout must be one of {QKV_LAYOUTS}, got {qkv_layout!r}")
        self.channels, self.heads, self.qkv_layout = channels, heads, qkv_layout
        self.norm = nn.GroupNorm(groups, channels, eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x):
        n, c, h, w = x.shape
        heads, d = self.heads, c // self.heads
        qkv = self.qkv(self.norm(x)).reshape(n, 3 * c, h * w)
        if self.qkv_layout == "chunked":
            q, k, v = (t.reshape(n * heads, d, h * w) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(n * heads, 3 * d, h * w).split(d, dim=1)
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) * d ** -0.5, -1)   # (N*heads, L, L)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(n, c, h, w)
        return x + self.proj_out(a)


class TimmNonLocalAttn(nn.Module):
    """timm.layers.non_local_attn.NonLocalAttn, as timm writes it (same keys t, p, g, z, norm).

    x: (N, C, H, W) -> norm(z(y)) + x, y = softmax(scale * t^T p) g over the H*W positions,
    with scale = C ** -0.5 (the block's input channels, not the reduced ones) when use_scale.
    """

    def __init__(self, in_channels, use_scale=True, rd_ratio=1 / 8, rd_channels=None, rd_divisor=8, **_):
        super().__init__()
        if rd_channels is None:
            rd_channels = make_divisible(in_channels * rd_ratio, divisor=rd_divisor)
        self.scale = in_channels ** -0.5 if use_scale else 1.0
        self.t = nn.Conv2d(in_channels, rd_channels, kernel_size=1, stride=1, bias=True)
        self.p = nn.Conv2d(in_channels, rd_channels, kernel_size=1, stride=1, bias=True)
        self.g = nn.Conv2d(in_channels, rd_channels, kernel_size=1, stride=1, bias=True)
        self.z = nn.Conv2d(rd_channels, in_channels, kernel_size=1, stride=1, bias=True)
        self.norm = nn.BatchNorm2d(in_channels)
        self.reset_parameters()

    def forward(self, x):
        shortcut = x
        t, p, g = self.t(x), self.p(x), self.g(x)
        B, C, H, W = t.size()
        t = t.view(B, C, -1).permute(0, 2, 1)
        p = p.view(B, C, -1)
        g = g.view(B, C, -1).permute(0, 2, 1)
        att = torch.bmm(t, p) * self.scale
        att = F.softmax(att, dim=2)
        x = torch.bmm(att, g)
        x = x.permute(0, 2, 1).reshape(B, C, H, W)
        x = self.z(x)
        return self.norm(x) + shortcut

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0)
                nn.init.constant_(m.bias, 0)
