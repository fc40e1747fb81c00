"""Modules over the fused ops.

Each fused module holds exactly the submodules of the layer it stands for
(timm's or the official implementation's), so `state_dict` keys and values are
the same and checkpoints load both ways. `fastattn.convert` builds them from
existing layers with `from_module`. Every module checks its input at the top of
forward (rank, channels, floating dtype, device: fastattn._validate.check_module_input),
so that a wrong x gets an error naming the module rather than one from deep inside.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn import functional as FA
from fastattn import twins
from fastattn._backend import BACKENDS, choose, fused_or_fallback, op_backends
from fastattn._fused_cbam import CbamSpec, FusedCBAMFunction, inference_forward
from fastattn._validate import check_inplace_input, check_module_input

FLAVORS = ("timm", "timm_light", "official")


def _check_flavor(flavor: str) -> str:
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
    return flavor


def _adopted(cls, module: nn.Module, *adopt_args):
    """An instance of `cls` holding `module`'s own submodules (shared, not copied), in its train mode."""
    fused = cls.__new__(cls)
    nn.Module.__init__(fused)
    fused._adopt(module, *adopt_args)
    fused.train(module.training)
    return fused


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


def _grad_wanted(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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

    On the cpu backend, a call that needs no gradient (torch.no_grad(), or nothing requires grad)
    with BatchNorm on its running statistics (eval mode) runs as one op, cbam_forward_eval, that
    reads x twice instead of three times (README "CBAM memory traffic").

    Under torch.autocast with x in the autocast dtype the block stays fused, in the dtypes the
    original gives there (see _autocast_forward); any other x under autocast, and parameters of
    another dtype than x outside it, run the original forward.

    inplace=True writes y over x and returns x, as nn.ReLU(inplace=True) does: the caller must not
    need x afterwards. It is for inference: where a gradient is wanted (grad mode on and x or a
    parameter requires grad) it raises RuntimeError, since the backward needs the x it would
    overwrite; so does an inference tensor outside torch.inference_mode(), and an x whose elements
    share memory (expand()) raises ValueError. With a contiguous or channels_last CPU x on the cpu
    backend and BatchNorm on its running statistics it runs the in-place op cbam_forward_eval_: no
    output allocated, x read twice and written once. Everywhere else (another device or backend,
    BatchNorm in training mode under no_grad, other strides, autocast) y is computed out of place and
    copied into x, so `x is y` holds in every case that does not raise. `inplace` is a plain
    attribute: set it to False to train the same module.
    """

    inplace = False  # modules pickled before the option existed

    def __init__(self, channels: int, reduction: int = 16, *, flavor: str = "timm", spatial_kernel: int = 7,
                 no_spatial: bool = False, backend: str = "auto", inplace: bool = False):
        super().__init__()
        if _check_flavor(flavor) == "official":
            twin = twins.OfficialCBAM(channels, reduction, no_spatial=no_spatial, kernel_size=spatial_kernel)
        else:
            if no_spatial:
                raise ValueError("no_spatial=True exists only in the official flavor")
            twin = twins.TimmCBAM(channels, 1.0 / reduction, spatial_kernel_size=spatial_kernel,
                                      light=flavor == "timm_light")
        self._adopt(twin, flavor, backend, inplace)

    @classmethod
    def from_module(cls, module: nn.Module, flavor: str, backend: str = "auto", inplace: bool = False) -> "CBAM":
        """A fused CBAM holding `module`'s own submodules (shared, not copied)."""
        return _adopted(cls, module, flavor, backend, inplace)

    def _adopt(self, source: nn.Module, flavor: str, backend: str, inplace: bool = False) -> None:
        self.flavor = flavor
        self.backend = _check_backend(backend)
        self.inplace = bool(inplace)
        self.no_spatial = bool(getattr(source, "no_spatial", False))
        # the source's own forward is the eager path (reference backend, empty batches, float64 on GPU ...)
        self._eager_cls = type(source)
        for name, child in source.named_children():
            self.add_module(name, child)

    def _parts(self):
        """(fc1, fc2, conv, bn) whatever the flavour's layout. Read from the modules' own dicts: a
        call comes right after a large op, with the interpreter's data out of cache, where each
        nn.Module.__getattr__ is costly (a batch-1 call is mostly such overhead)."""
        modules = self._modules
        if self.flavor == "official":
            mlp = modules["ChannelGate"]._modules["mlp"]._modules
            if self.no_spatial:
                return mlp["1"], mlp["3"], None, None
            spatial = modules["SpatialGate"]._modules["spatial"]._modules
            return mlp["1"], mlp["3"], spatial["conv"], spatial["bn"]
        channel, conv = modules["channel"]._modules, modules["spatial"]._modules["conv"]._modules
        return channel["fc1"], channel["fc2"], conv["conv"], conv["bn"]

    def forward(self, x: Tensor) -> Tensor:
        parts = self._parts()
        fc1_weight = parts[0]._parameters["weight"]  # (hidden, C) or (hidden, C, 1, 1)
        device = check_module_input(self, x, fc1_weight.shape[1], fc1_weight)
        if self.inplace:
            check_inplace_input(self, x)
        backend, _ = choose("cbam", device, x.dtype, self.backend)
        if backend == "reference" or x.numel() == 0:
            y = self._eager_cls.forward(self, x)
        elif torch.is_autocast_enabled(device.type):
            y = self._autocast_forward(x, backend, parts)
        elif fc1_weight.dtype != x.dtype:
            y = self._eager_cls.forward(self, x)
        else:
            y = self._fused(x, backend, parts)
        if self.inplace and y is not x:  # no in-place kernel for this case: y written over x all the same
            return x.copy_(y)
        return y

    def _autocast_forward(self, x: Tensor, backend: str, parts: tuple) -> Tensor:
        """Under torch.autocast, what the original computes there: when x has the autocast dtype (the
        output of an autocast conv, as in mixed-precision training), the MLP and the conv run in it
        with their weights cast (their gradients come back in the weights' dtype through the cast),
        BatchNorm takes the map in that dtype with its own float32 parameters and statistics, and
        everything else stays in x's dtype. That is the fused path on weights cast to x's dtype.
        Any other x (float32 or float64 under a 16-bit autocast) runs the original forward."""
        weight_dtype = parts[0].weight.dtype
        if x.dtype != torch.get_autocast_dtype(x.device.type) or weight_dtype not in (torch.float32, x.dtype):
            return self._eager_cls.forward(self, x)
        with torch.autocast(x.device.type, enabled=False):
            return self._fused(x, backend, parts, cast_weights=True)

    def _fused(self, x: Tensor, backend: str, parts: tuple | None = None, cast_weights: bool = False) -> Tensor:
        """The fused path on `backend`'s kernels ("reference" runs the op contract in PyTorch, for tests).
        cast_weights: the MLP's and the conv's weights cast to x's dtype (autocast); BatchNorm's stay."""
        fc1, fc2, conv, bn = parts or self._parts()
        batch_stats = True if conv is None else (bn.training or bn.running_mean is None)
        if conv is not None and batch_stats and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            # nn.BatchNorm2d's own refusal: the variance of one value is no statistic
            raise ValueError("Expected more than 1 value per channel when training, got input size "
                             f"{torch.Size((x.shape[0], 1, *x.shape[2:]))}")
        spec = CbamSpec(light=self.flavor == "timm_light", max_first=self.flavor == "official",
                        split_ties=self.flavor != "official", no_spatial=self.no_spatial,
                        padding=(0, 0) if conv is None else tuple(conv.padding),
                        bn_eps=1e-5 if conv is None else bn.eps, bn_batch_stats=batch_stats, backend=backend,
                        # auto on a GPU picks each op's backend; a backend named (or the reference) runs every op
                        op_backends=op_backends("cbam", x.device, x.dtype)
                        if self.backend == "auto" and backend != "reference" else ())
        # (w1, b1, w2, b2, conv_w, bn_weight, bn_bias, bn_mean, bn_var), each read once
        params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias) + (
            (None,) * 5 if conv is None else (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var))
        if cast_weights:  # the Linear and conv weights and biases; BatchNorm's parameters and statistics stay
            params = tuple(p if p is None else p.to(x.dtype) for p in params[:5]) + params[5:]
        if backend == "cpu" and (conv is None or not batch_stats) and not _grad_wanted(x, *params[:7]):
            return inference_forward(x, *params, spec, inplace=self.inplace)
        y, mean, var = FusedCBAMFunction.apply(x, *params, spec)
        if conv is not None and bn.training and bn.track_running_stats:
            _update_running_stats(bn, mean, var, x.shape[0] * x.shape[2] * x.shape[3])
        return y

    def extra_repr(self) -> str:
        return (f"flavor={self.flavor!r}, backend={self.backend!r}" + (", no_spatial=True" if self.no_spatial else "")
                + (", inplace=True" if self.inplace else ""))


class ChannelGate(nn.Module):
    """CBAM's channel gate alone: x * sigmoid(mlp(avgpool(x)) + mlp(maxpool(x))).

    x: (N, C, H, W) -> (N, C, H, W). Layout of timm's ChannelAttn (fc1, act, fc2)
    for flavor "timm"/"timm_light", of the official ChannelGate (mlp) for "official".
    """

    def __init__(self, channels: int, reduction: int = 16, *, flavor: str = "timm", backend: str = "auto"):
        super().__init__()
        self.flavor, self.backend = _check_flavor(flavor), _check_backend(backend)
        if flavor == "official":
            self.mlp = twins.OfficialChannelGate(channels, reduction).mlp
        else:
            twin = twins.TimmChannelAttn(channels, 1.0 / reduction, light=flavor == "timm_light")
            self.fc1, self.act, self.fc2 = twin.fc1, twin.act, twin.fc2

    def _mlp(self, v: Tensor) -> Tensor:
        if self.flavor == "official":
            return self.mlp(v)
        return self.fc2(self.act(self.fc1(v[:, :, None, None]))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        fc1_weight = (self.mlp[1] if self.flavor == "official" else self.fc1).weight
        check_module_input(self, x, fc1_weight.shape[1], fc1_weight)
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
        self.flavor, self.backend = _check_flavor(flavor), _check_backend(backend)
        if flavor == "official":
            twin = twins.OfficialSpatialGate(kernel_size)
            self.compress, self.spatial = twin.compress, twin.spatial
        else:
            self.conv = twins.TimmSpatialAttn(kernel_size, light=flavor == "timm_light").conv

    def forward(self, x: Tensor) -> Tensor:
        conv = self.spatial.conv if self.flavor == "official" else self.conv.conv
        check_module_input(self, x, None, conv.weight)  # the gate pools over channels: any C
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


# --------------------------------------------------------------------------
# Spatial-attention blocks over fastattn.spatial_attention
# --------------------------------------------------------------------------
class _FusedAttentionBlock(nn.Module):
    """What the attention blocks share: they adopt the submodules, parameters and
    plain attributes of a twin layer (fastattn.twins' or timm's), run its class's own
    forward as the eager path, and their own `_fused` otherwise. Only the
    softmax(QK)V core changes; the convs and norms are the layer's own."""

    _input_conv: str  # the 1x1 conv that reads x: its weight gives the channels and device x must have

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto"):
        """A fused block holding `module`'s own submodules and parameters (shared, not copied)."""
        return _adopted(cls, module, backend)

    def _adopt(self, source: nn.Module, backend: str) -> None:
        self.backend = _check_backend(backend)
        # the source's own forward is the eager path (the reference backend)
        self._eager_cls = type(source)
        for key, value in vars(source).items():  # plain attributes its forward reads (scale, heads, ...)
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        for name, param in source.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in source.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in source._non_persistent_buffers_set)
        for name, child in source.named_children():
            self.add_module(name, child)

    def forward(self, x: Tensor) -> Tensor:
        conv = self._modules[self._input_conv]
        device = check_module_input(self, x, conv.in_channels, conv._parameters["weight"])
        return self._run(x, device)

    def _run(self, x: Tensor, device: torch.device) -> Tensor:
        """The block on a checked x: the eager path on the reference backend, else `_fused`."""
        return fused_or_fallback(x, self.backend, lambda backend: self._fused(x, backend),
                                 lambda: self._eager_cls.forward(self, x), device=device)

    def _fused(self, x: Tensor, backend: str) -> Tensor:
        """The block with its attention core on `backend` ("reference": the eager
        function, which lets tests drive this path without compiled kernels)."""
        raise NotImplementedError


class NonLocal2d(_FusedAttentionBlock):
    """Fused embedded-Gaussian non-local block (Wang et al., 2018); twin of
    fastattn.twins.NonLocal2d, same state_dict keys.

    x: (N, C, H, W) -> (N, C, H, W) = x + out_norm(out_conv(y)), with Ci = inter_channels,
    y = softmax(scale * theta(x)^T phi(x)) g(x): theta (N, Ci, H, W); phi, g (N, Ci, H', W'),
    H' x W' = H x W, or H/2 x W/2 with sub_sample (2x2 max pool after the conv).
    channels // reduction = Ci unless inter_channels is given; scale = Ci ** -0.5 with
    use_scale, else 1.0. out_norm (BatchNorm2d) starts at zero: a new block is the identity.
    """

    _input_conv = "theta"

    def __init__(self, channels: int, reduction: int = 2, *, inter_channels: int | None = None,
                 sub_sample: bool = False, use_scale: bool = True, backend: str = "auto"):
        super().__init__()
        self._adopt(twins.NonLocal2d(channels, reduction, inter_channels=inter_channels,
                                         sub_sample=sub_sample, use_scale=use_scale), backend)

    def _fused(self, x: Tensor, backend: str) -> Tensor:
        q = self.theta(x)
        k = self.pool(self.phi(x))
        v = self.pool(self.g(x))
        y = FA.spatial_attention(q, k, v, scale=self.scale, backend=backend)
        return x + self.out_norm(self.out_conv(y))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, inter_channels={self.inter_channels}, sub_sample={self.sub_sample}, "
                f"scale={self.scale:.4g}, backend={self.backend!r}")


class SelfAttention2d(_FusedAttentionBlock):
    """Fused SAGAN / BigGAN self-attention; twin of fastattn.twins.SelfAttention2d
    (BigGAN-PyTorch's keys theta, phi, g, o, gamma).

    x: (N, C, H, W), H, W >= 2 -> (N, C, H, W) = x + gamma * o(y), with
    y = softmax(theta(x)^T phi(x)) g(x), no scaling: theta (N, C/8, H, W);
    phi (N, C/8, H/2, W/2) and g (N, C/2, H/2, W/2), 2x2 max-pooled. gamma starts at 0.
    """

    _input_conv = "theta"

    def __init__(self, channels: int, *, backend: str = "auto"):
        super().__init__()
        self._adopt(twins.SelfAttention2d(channels), backend)

    def _fused(self, x: Tensor, backend: str) -> Tensor:
        q = self.theta(x)
        k = F.max_pool2d(self.phi(x), [2, 2])
        v = F.max_pool2d(self.g(x), [2, 2])
        y = FA.spatial_attention(q, k, v, scale=1.0, backend=backend)
        return self.gamma * self.o(y) + x

    def extra_repr(self) -> str:
        return f"channels={self.channels}, backend={self.backend!r}"


class AttentionBlock2d(_FusedAttentionBlock):
    """Fused attention block of diffusion U-Nets and VAEs; twin of
    fastattn.twins.AttentionBlock2d (keys norm, qkv, proj_out).

    x: (N, C, H, W) -> (N, C, H, W) = x + proj_out(attention(qkv(norm(x)))): GroupNorm(groups, C),
    a 1x1 conv C -> 3C, multi-head softmax(d ** -0.5 q^T k) v with d = C / heads over the
    H*W positions, a 1x1 conv C -> C that starts at zero. qkv_layout "chunked" ([q | k | v])
    reads q, k, v in place from the qkv map; "per_head" ([q_h k_h v_h] per head) copies them.
    """

    _input_conv = "qkv"

    def __init__(self, channels: int, heads: int = 1, *, groups: int = 32, eps: float = 1e-5,
                 qkv_layout: str = "chunked", backend: str = "auto"):
        super().__init__()
        self._adopt(twins.AttentionBlock2d(channels, heads, groups=groups, eps=eps, qkv_layout=qkv_layout),
                    backend)

    def _fused(self, x: Tensor, backend: str) -> Tensor:
        c, heads = x.shape[1], self.heads
        d = c // heads
        qkv = self.qkv(self.norm(x))                                  # (N, 3C, H, W)
        if self.qkv_layout == "chunked":
            q, k, v = qkv.chunk(3, dim=1)                             # views
        else:
            q, k, v = (t.flatten(1, 2) for t in qkv.unflatten(1, (heads, 3, d)).unbind(2))
        a = FA.spatial_attention(q, k, v, heads=heads, scale=d ** -0.5, backend=backend)
        return x + self.proj_out(a)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, heads={self.heads}, qkv_layout={self.qkv_layout!r}, "
                f"backend={self.backend!r}")


class NonLocalAttn(_FusedAttentionBlock):
    """Fused timm.layers.non_local_attn.NonLocalAttn (and its twin
    fastattn.twins.TimmNonLocalAttn): same keys t, p, g, z, norm, same numerics.

    x: (N, C, H, W) -> (N, C, H, W) = norm(z(y)) + x, y = softmax(scale * t(x)^T p(x)) g(x)
    over the H*W positions; t, p, g: (N, Cr, H, W). Note timm's scale is C ** -0.5, the
    block's input channels, not Cr ** -0.5 (1.0 with use_scale=False).
    """

    _input_conv = "t"

    def __init__(self, in_channels: int, use_scale: bool = True, rd_ratio: float = 1 / 8,
                 rd_channels: int | None = None, rd_divisor: int = 8, *, backend: str = "auto"):
        super().__init__()
        self._adopt(twins.TimmNonLocalAttn(in_channels, use_scale, rd_ratio, rd_channels, rd_divisor), backend)

    def _fused(self, x: Tensor, backend: str) -> Tensor:
        y = FA.spatial_attention(self.t(x), self.p(x), self.g(x), scale=self.scale, backend=backend)
        return self.norm(self.z(y)) + x

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, backend={self.backend!r}"
