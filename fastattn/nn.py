"""Modules over the fused ops.

Each fused module holds exactly the submodules of the layer it stands for
(timm's or the official implementation's), so `state_dict` keys and values are
the same and checkpoints load both ways. `fastattn.convert` builds them from
existing layers with `from_module`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastattn import functional as FA
from fastattn import reference
from fastattn._backend import BACKENDS, choose
from fastattn._fused_cbam import CbamSpec, FusedCBAMFunction

FLAVORS = ("timm", "timm_light", "official")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """What nn.BatchNorm2d does to its buffers in a training step."""
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        unbiased = var * (count / max(count - 1, 1))
        bn.running_mean.mul_(1 - momentum).add_(mean.to(bn.running_mean.dtype), alpha=momentum)
        bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)


class CBAM(nn.Module):
    """Fused CBAM: channel gate (avg+max pool -> shared MLP -> sigmoid) then spatial
    gate (mean+max over channels -> k x k conv -> BatchNorm -> sigmoid).

    x: (N, C, H, W) -> (N, C, H, W), same memory format.

    flavor:
      "timm"       timm.layers.cbam.CbamModule: 1x1-conv MLP without bias, hidden
                   make_divisible(C / reduction, 1), conv input cat[mean, max], amax ties split.
      "timm_light" timm.layers.cbam.LightCbamModule: one MLP on 0.5*avg + 0.5*max,
                   one-channel conv input 0.5*mean + 0.5*max.
      "official"   Jongchan/attention-module CBAM: Linear MLP with biases, hidden
                   C // reduction, conv input cat[max, mean], BN momentum 0.01, max
                   gradients to one index. Its checkpoints load as they are.
    """

    def __init__(self, channels: int, reduction: int = 16, *, flavor: str = "timm", spatial_kernel: int = 7,
                 no_spatial: bool = False, backend: str = "auto"):
        super().__init__()
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
        if flavor == "official":
            twin = reference.OfficialCBAM(channels, reduction, no_spatial=no_spatial, kernel_size=spatial_kernel)
        else:
            if no_spatial:
                raise ValueError("no_spatial=True exists only in the official flavor")
            twin = reference.TimmCBAM(channels, 1.0 / reduction, spatial_kernel_size=spatial_kernel,
                                      light=flavor == "timm_light")
        self._adopt(twin, flavor, backend)

    @classmethod
    def from_module(cls, module: nn.Module, flavor: str, backend: str = "auto") -> "CBAM":
        """A fused CBAM holding `module`'s own submodules (shared, not copied)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._adopt(module, flavor, backend)
        fused.train(module.training)
        return fused

    def _adopt(self, source: nn.Module, flavor: str, backend: str) -> None:
        self.flavor = flavor
        self.backend = _check_backend(backend)
        self.no_spatial = bool(getattr(source, "no_spatial", False))
        # the source's own forward is the eager path (reference backend, empty batches, float64 on GPU ...)
        self._eager_cls = type(source)
        for name, child in source.named_children():
            self.add_module(name, child)

    def _parts(self):
        """(fc1, fc2, conv, bn) whatever the flavour's layout."""
        if self.flavor == "official":
            mlp = self.ChannelGate.mlp
            spatial = None if self.no_spatial else self.SpatialGate.spatial
            return mlp[1], mlp[3], spatial and spatial.conv, spatial and spatial.bn
        return self.channel.fc1, self.channel.fc2, self.spatial.conv.conv, self.spatial.conv.bn

    def forward(self, x: Tensor) -> Tensor:
        backend, _ = choose("cbam", x.device, x.dtype, self.backend)
        fc1, fc2, conv, bn = self._parts()
        if backend == "reference" or x.numel() == 0 or fc1.weight.dtype != x.dtype \
                or torch.is_autocast_enabled(x.device.type):
            return self._eager_cls.forward(self, x)
        return self._fused(x, backend)

    def _fused(self, x: Tensor, backend: str) -> Tensor:
        """The fused path on `backend`'s kernels ("reference" runs the op contract in PyTorch, for tests)."""
        fc1, fc2, conv, bn = self._parts()
        batch_stats = True if conv is None else (bn.training or bn.running_mean is None)
        spec = CbamSpec(light=self.flavor == "timm_light", max_first=self.flavor == "official",
                        split_ties=self.flavor != "official", no_spatial=self.no_spatial,
                        padding=(0, 0) if conv is None else tuple(conv.padding),
                        bn_eps=1e-5 if conv is None else bn.eps, bn_batch_stats=batch_stats, backend=backend)
        conv_w = None if conv is None else conv.weight
        bn_params = (None,) * 4 if conv is None else (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        y, mean, var = FusedCBAMFunction.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, conv_w,
                                               *bn_params, spec)
        if conv is not None and bn.training and bn.track_running_stats:
            _update_running_stats(bn, mean, var, x.shape[0] * x.shape[2] * x.shape[3])
        return y

    def extra_repr(self) -> str:
        return f"flavor={self.flavor!r}, backend={self.backend!r}" + (", no_spatial=True" if self.no_spatial else "")


class ChannelGate(nn.Module):
    """CBAM's channel gate alone: x * sigmoid(mlp(avgpool(x)) + mlp(maxpool(x))).

    x: (N, C, H, W) -> (N, C, H, W). Layout of timm's ChannelAttn (fc1, act, fc2)
    for flavor "timm"/"timm_light", of the official ChannelGate (mlp) for "official".
    """

    def __init__(self, channels: int, reduction: int = 16, *, flavor: str = "timm", backend: str = "auto"):
        super().__init__()
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
        self.flavor, self.backend = flavor, _check_backend(backend)
        if flavor == "official":
            self.mlp = reference.OfficialChannelGate(channels, reduction).mlp
        else:
            twin = reference.TimmChannelAttn(channels, 1.0 / reduction, light=flavor == "timm_light")
            self.fc1, self.act, self.fc2 = twin.fc1, twin.act, twin.fc2

    def _mlp(self, v: Tensor) -> Tensor:
        if self.flavor == "official":
            return self.mlp(v)
        return self.fc2(self.act(self.fc1(v[:, :, None, None]))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        ties = "first" if self.flavor == "official" else "split"
        avg, mx = FA.channel_pool(x, ties=ties, backend=self.backend)
        pre = self._mlp(0.5 * avg + 0.5 * mx) if self.flavor == "timm_light" else self._mlp(avg) + self._mlp(mx)
        ones = x.new_ones(x.shape[0], *x.shape[2:])
        return FA.cbam_apply(x, torch.sigmoid(pre), ones, backend=self.backend)

    def extra_repr(self) -> str:
        return f"flavor={self.flavor!r}, backend={self.backend!r}"


class SpatialGate(nn.Module):
    """CBAM's spatial gate alone: x * sigmoid(bn(conv(pool_c(x)))).

    x: (N, C, H, W) -> (N, C, H, W). Layout of timm's SpatialAttn (conv.conv,
    conv.bn) or of the official SpatialGate (compress, spatial.conv, spatial.bn).
    """

    def __init__(self, kernel_size: int = 7, *, flavor: str = "timm", backend: str = "auto"):
        super().__init__()
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
        self.flavor, self.backend = flavor, _check_backend(backend)
        if flavor == "official":
            twin = reference.OfficialSpatialGate(kernel_size)
            self.compress, self.spatial = twin.compress, twin.spatial
        else:
            self.conv = reference.TimmSpatialAttn(kernel_size, light=flavor == "timm_light").conv

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        ties = "first" if self.flavor == "official" else "split"
        pooled = FA.gated_spatial_pool(x, x.new_ones(n, c), ties=ties, backend=self.backend)
        if self.flavor == "official":
            gate = self.spatial(pooled.flip(1))
        elif self.flavor == "timm_light":
            gate = self.conv(0.5 * pooled[:, 0:1] + 0.5 * pooled[:, 1:2])
        else:
            gate = self.conv(pooled)
        return FA.cbam_apply(x, x.new_ones(n, c), torch.sigmoid(gate), backend=self.backend)

    def extra_repr(self) -> str:
        return f"flavor={self.flavor!r}, backend={self.backend!r}"
