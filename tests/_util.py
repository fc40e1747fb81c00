"""Shared test helpers: the accuracy contract (stated in tests/_contract.py, re-exported here), backend
lists, module drivers."""
from __future__ import annotations

import functools
import importlib.util
import io
import json
import os
import subprocess
import sys
import threading

import torch

import fastattn
from fastattn import _backend
from fastattn.reference import ref_spatial_attention_forward

from _contract import ATOL, GRAD_ATOL, assert_equal_values, assert_error_rule, max_err  # noqa: F401


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The fastattn ops a call dispatches: `with OpLog() as log: ...; log.ops`."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastattn":
            self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def compiled_backends(device: str = "cpu") -> list[str]:
    """The non-reference backends that can run on `device` here."""
    names = []
    for name in ("cpu", "cuda", "triton"):
        if _backend._PREDICATES[name]("cbam", torch.device(device), torch.float32) is None:
            names.append(name)
    return names


def attention_backends(device: str = "cpu") -> list[str]:
    """The non-reference backends whose attention kernels exist here: each appears
    in the tests as soon as its kernels land (a Triton backend needs its kernel file)."""
    names = []
    for name in ("cpu", "cuda", "triton"):
        if _backend._PREDICATES[name]("attention", torch.device(device), torch.float32) is not None:
            continue
        if name == "triton" and importlib.util.find_spec("fastattn.triton_kernels.attention") is None:
            continue
        names.append(name)
    return names


def run_fused_on_reference_ops(model: torch.nn.Module) -> torch.nn.Module:
    """Makes every fused fastattn module of `model` run its fused code path (`_fused`)
    over the op contract written in PyTorch, in place: drives that path without kernels."""
    for module in model.modules():
        if hasattr(module, "_fused") and type(module).__module__.startswith("fastattn."):
            module.forward = functools.partial(type(module)._fused, module, backend="reference")
    return model


def saved_state_dict(module: torch.nn.Module) -> dict:
    """module's state_dict as a checkpoint gives it back: through torch.save and torch.load."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf)


def assert_same_state_dict(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The same keys in the same order, with equal values."""
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert list(sd_a) == list(sd_b)
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fastattn_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


__all__ = ["ATOL", "GRAD_ATOL", "assert_equal_values", "fastattn", "assert_error_rule", "attention_backends", "compiled_backends", "interpreted", "max_err",
           "run_fused_on_reference_ops"]


def run_case_script(script: str, timeout: float = 300) -> list[dict]:
    """Runs `script` (a file of tests/ that prints one JSON line per case, then {"done": true}) in a
    fresh interpreter and returns the cases' lines. A crash of that process (segfault, abort) fails
    the caller with how far it got, instead of taking pytest down with it."""
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines and lines[-1].get("done"), (
        f"{os.path.basename(script)} died (rc {proc.returncode}) after {len(lines)} cases; "
        f"last: {lines[-1] if lines else None}\nstderr:\n{proc.stderr[-3000:]}")
    return lines[:-1]


def run_in_threads(work, args, timeout: float = 120) -> list:
    """work(arg) in one thread per arg, all started together at a barrier -> their results in the
    order of args. A thread that raises or is still running after `timeout` s fails the caller."""
    start = threading.Barrier(len(args))
    results, errors = [None] * len(args), []

    def run(i, arg):
        try:
            start.wait(timeout=60)
            results[i] = work(arg)
        except Exception as exc:  # noqa: BLE001  (reported by the calling thread)
            errors.append(f"thread {i}: {exc!r}")

    threads = [threading.Thread(target=run, args=(i, arg)) for i, arg in enumerate(args)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    return results


def print_case_results(cases) -> None:
    """The script side of run_case_script: cases are (fields, call); prints fields plus the type and
    message of what call() raised ("no error" and the result's shape when it raised nothing)."""
    for fields, call in cases:
        try:
            result = call()
            kind, message = "no error", repr(getattr(result, "shape", result))
        except Exception as exc:  # noqa: BLE001  (the test judges every type)
            kind, message = type(exc).__name__, str(exc)
        print(json.dumps(dict(fields, type=kind, message=message)), flush=True)
    print(json.dumps(dict(done=True)), flush=True)


def compiled_ops(op: str, dispatch_key: str):
    """torch.ops.fastattn from the installed fastattn._C, checked to hold `op` for the dispatch key."""
    from fastattn import _ext
    assert _ext.has_kernel(op, dispatch_key), (
        f"fastattn._C has no {dispatch_key} kernel for {op} (load error: {_ext.LOAD_ERROR}); run `make build`")
    return torch.ops.fastattn


def run_module(module, x, grad_y, mode, autocast_dtype=None, catch=()):
    """One call of module in mode "train", "eval" or "eval-no-grad" (no gradient anywhere), under a CPU
    autocast of autocast_dtype (None: none) -> (y, {"x": dx, name: d param} (empty without grad),
    {float buffer name: value}); or the exception of a type in `catch` that the forward raised."""
    module.train(mode == "train")
    x = x.detach().requires_grad_(mode != "eval-no-grad")
    try:
        with torch.set_grad_enabled(mode != "eval-no-grad"), \
                torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            y = module(x)
    except catch as error:
        return error
    grads = {}
    if mode != "eval-no-grad":
        y.backward(grad_y.to(y.dtype))
        grads = {"x": x.grad, **{name: p.grad for name, p in module.named_parameters()}}
    return y.detach(), grads, {name: b.clone() for name, b in module.named_buffers() if b.is_floating_point()}


def module_forward_backward(module, x, grad_y):
    """y = module(x) and the gradients of x ("x") and of every parameter (by name) for grad_y."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(grad_y)
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return y, grads


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, also where a block starts at zero (BN gamma, SAGAN gamma, proj_out,
    NonLocal2d's out_norm); running statistics too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)


def check_minus_inf_keys_drop_out(forward, device: str) -> None:
    """forward(q, k, v, heads, scale) -> (out, lse), an attention backend's op. With q > 0 and the
    first 600 keys -inf in every channel, those keys' logits are -inf over more than any key block,
    so a row's online softmax starts from a max of -inf: they must weigh 0, as in the reference's
    softmax (no NaN from -inf - -inf)."""
    gen = torch.Generator(device=device).manual_seed(7)
    q = torch.rand(1, 16, 40, generator=gen, device=device) + 0.1
    k = torch.randn(1, 16, 700, generator=gen, device=device)
    v = torch.randn(1, 16, 700, generator=gen, device=device)
    k[:, :, :600] = -float("inf")
    out, lse = forward(q, k, v, 1, 0.25)
    ref_out, ref_lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), 1, 0.25)
    assert out.isfinite().all() and lse.isfinite().all()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=1e-5)
