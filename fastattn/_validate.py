"""Argument checks shared by every backend: bad input raises ValueError or
TypeError naming the argument and the shapes, before any kernel runs."""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _describe(**tensors: Tensor | None) -> str:
    return ", ".join(f"{name}: {tuple(t.shape)} {t.dtype} on {t.device}" for name, t in tensors.items()
                     if t is not None)


def check_tensor(name: str, t, ranks: tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype} "
                        f"(shape {tuple(t.shape)})")


def check_same(**tensors: Tensor | None) -> None:
    """Same dtype and device for every given tensor."""
    given = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(given.items()))
    for name, t in given.items():
        if t.dtype != first.dtype:
            raise TypeError(f"{name} and {first_name} must have the same dtype ({_describe(**given)})")
        if t.device != first.device:
            raise ValueError(f"{name} and {first_name} must be on the same device ({_describe(**given)})")


def check_cbam(x: Tensor, ch_gate: Tensor | None = None, sp_gate: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Checks CBAM arguments; returns the gates as (N, C) and (N, H, W) views."""
    check_tensor("x", x, (4,))
    n, c, h, w = x.shape
    if h * w == 0 and n * c > 0:
        raise ValueError(f"x must have at least one spatial position, got shape {tuple(x.shape)}")
    if ch_gate is not None:
        check_tensor("ch_gate", ch_gate, (2, 4))
        if ch_gate.dim() == 4 and ch_gate.shape[2:] != (1, 1):
            raise ValueError(f"ch_gate must be (N, C) or (N, C, 1, 1), got {tuple(ch_gate.shape)} for x {tuple(x.shape)}")
        if tuple(ch_gate.shape[:2]) != (n, c):
            raise ValueError(f"ch_gate must be (N, C) = {(n, c)} to match x {tuple(x.shape)}, "
                             f"got {tuple(ch_gate.shape)}")
        ch_gate = ch_gate.reshape(n, c)
    if sp_gate is not None:
        check_tensor("sp_gate", sp_gate, (3, 4))
        if sp_gate.dim() == 4 and sp_gate.shape[1] != 1:
            raise ValueError(f"sp_gate must be (N, 1, H, W) or (N, H, W), got {tuple(sp_gate.shape)} "
                             f"for x {tuple(x.shape)}")
        if tuple(sp_gate.shape[-2:]) != (h, w) or sp_gate.shape[0] != n:
            raise ValueError(f"sp_gate must be (N, 1, H, W) = {(n, 1, h, w)} to match x {tuple(x.shape)}, "
                             f"got {tuple(sp_gate.shape)}")
        sp_gate = sp_gate.reshape(n, h, w)
    check_same(x=x, ch_gate=ch_gate, sp_gate=sp_gate)
    return ch_gate, sp_gate


def check_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, (3, 4))
    shapes = _describe(q=q, k=k, v=v)
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(f"q, k and v must have the same rank ({shapes})")
    check_same(q=q, k=k, v=v)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r} ({shapes})")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k and v must have the same batch size N ({shapes})")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must have the same number of channels Cq ({shapes})")
    if k.shape[2:] != v.shape[2:]:
        raise ValueError(f"k and v must have the same spatial size ({shapes})")
    if q.shape[1] % heads or v.shape[1] % heads:
        raise ValueError(f"heads={heads} must divide the channels of q/k (Cq={q.shape[1]}) and of v "
                         f"(Cv={v.shape[1]}) ({shapes})")
    if q.shape[1] == 0 or v.shape[1] == 0:
        raise ValueError(f"q, k and v need at least one channel ({shapes})")
    if k.shape[2:].numel() == 0 and q.shape[2:].numel() > 0:
        raise ValueError(f"k and v need at least one position when q has some ({shapes})")


_SPATIAL_DIMS = {3: "L", 4: "H, W", 5: "D, H, W"}


def check_module_input(module, x, channels: int | None, like: Tensor, rank: int = 4) -> torch.device:
    """The input check at the top of a module's forward: x must be a floating-point tensor of shape
    (N, C, H, W) (rank 3: (N, C, L); rank 5: (N, C, D, H, W)) with C = `channels` (None: any C), on
    the device of `like`, one of the module's parameters. Raises ValueError/TypeError naming the
    module, what it expects and what it got. Returns x.device (for the caller's backend choice: one
    device object fewer per call). Every fastattn module calls it, and so should the fused modules of
    new convert rules.

    Costs well under a microsecond on the good path, and nothing in a torch.compile graph: rank,
    channels, dtype and device are guarded constants there."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{type(module).__name__} expects a torch.Tensor x, got {type(x).__name__}")
    shape = x.shape
    if len(shape) != rank or (channels is not None and shape[1] != channels):
        want = f"(N, {'C' if channels is None else channels}, {_SPATIAL_DIMS.get(rank, '...')})"
        raise ValueError(f"{type(module).__name__} expects x of shape {want}, got x of shape {tuple(shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{type(module).__name__} expects a floating-point x (float32, float16, bfloat16 or "
                        f"float64), got {x.dtype} x of shape {tuple(shape)}")
    device = x.device
    if device != like.device:
        raise ValueError(f"{type(module).__name__} expects x on {like.device}, where its parameters are, "
                         f"got x on {device} (shape {tuple(shape)})")
    return device


def check_inplace_input(module, x: Tensor) -> None:
    """The checks of a module built with inplace=True, before it writes its output over x (as
    nn.ReLU(inplace=True) writes over its input). RuntimeError where autograd or inference mode
    forbid the write (PyTorch raises RuntimeError there too); ValueError for an x whose memory
    cannot hold the output (elements that share memory, as expand() makes)."""
    name = type(module).__name__
    if torch.is_grad_enabled():
        wanted = ["x"] if x.requires_grad else []
        wanted += [f"parameter {n!r}" for n, p in module.named_parameters() if p.requires_grad]
        if wanted:
            raise RuntimeError(
                f"{name}(inplace=True) writes its output over x (shape {tuple(x.shape)}), but a gradient is wanted "
                f"({', '.join(wanted[:3])}{' ...' if len(wanted) > 3 else ''} requires grad) and the backward "
                "needs the x it would overwrite; call it under torch.no_grad() or torch.inference_mode(), or "
                "set inplace=False for training")
    if torch.compiler.is_compiling():  # the graph's input mutation is PyTorch's to check; these calls break graphs
        return
    if x.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"{name}(inplace=True) cannot write over x (shape {tuple(x.shape)}): x is an inference "
                           "tensor and in-place updates to it are allowed only inside torch.inference_mode()")
    if torch._debug_has_internal_overlap(x) == 1:
        raise ValueError(f"{name}(inplace=True) cannot write over x of shape {tuple(x.shape)} and strides "
                         f"{x.stride()}: several of its elements share one memory location (a view made by "
                         "expand() or as_strided()); pass x.contiguous() or set inplace=False")
