"""Providers by name, per family. Each prepares one callable per case.

cbam:       fastattn-<backend> (fastattn.nn.CBAM, timm flavour, weights copied
            from the timm module), timm (timm.layers.cbam.CbamModule, eager),
            compile (torch.compile of the timm module).
attention:  fastattn-<backend> (fastattn.spatial_attention), eager
            (fastattn.eager.spatial_attention: bmm-softmax-bmm), sdpa
            (F.scaled_dot_product_attention as a user calls it on NCHW maps:
            permute to (N, heads, L, d), contiguous, SDPA picking its kernel,
            permute back), sdpa-<kernel> (the same call with one SDPA kernel
            forced through torch.nn.attention.sdpa_kernel; on a GPU), flash-attn
            (FlashAttention-2's flash_attn_func, where the package is installed;
            on a GPU), compile (torch.compile of the eager formula).
            Not run unless named in --providers: sdpa-nchw-views (SDPA on the
            NCHW maps' strided views, no copies: PyTorch's math path) and, on
            the CPU, sdpa-<kernel>.
models:     timm (the original model), fastattn-<backend> (fastattn.convert; the
            compiled backends only).

fastattn backends listed per device whether or not they are built: one that
cannot run is reported as failed, with the reason, never dropped; so is an SDPA
kernel that refuses a case, and flash-attn where it is not installed.
With --unverified, fastattn-<backend>-unverified runs the kernel variants that
have not yet passed the GPU tests (fastattn._verified) beside the verified ones:
FASTATTN_UNVERIFIED_KERNELS=1 is set around each of its calls, so the switch must
be read per call on both the Python and the C++ side.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from bench.cases import Case

FASTATTN_BACKENDS = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
# the kernels of F.scaled_dot_product_attention that sdpa_kernel can force: provider sdpa-<name>
SDPA_KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                "math": "MATH"}
_FORCED_SDPA = tuple(f"sdpa-{k}" for k in SDPA_KERNELS)
OTHERS = {
    "cbam": {"cpu": ("timm", "compile"), "cuda": ("timm", "compile")},
    # one fused SDPA kernel on the CPU (flash) besides math: the forced ones are run when named
    "attention": {"cpu": ("eager", "sdpa", "compile"),
                  "cuda": ("eager", "sdpa", *_FORCED_SDPA, "flash-attn", "compile")},
    "models": {"cpu": ("timm",), "cuda": ("timm",)},
}
# run only when --providers names them
# fastattn-cpu-inplace: nn.CBAM(inplace=True), inference (fwd) only
INPLACE = "fastattn-cpu-inplace"
OPTIONAL = {"cbam": (INPLACE,), "attention": ("sdpa-nchw-views", *_FORCED_SDPA), "models": ()}
INJECTED_FAILURE = "injected-failure"
UNVERIFIED_SUFFIX = "-unverified"


def is_fastattn(name: str) -> bool:
    return name.startswith("fastattn-")


def unverified_backends(family: str, device_type: str) -> list[str]:
    """The backends of `device_type` with a kernel variant of `family` not yet verified on a GPU
    (fastattn._verified, variants named <backend>_<family>_<what>)."""
    from fastattn import _verified
    pending = {name.split("_")[0] for name, variant in _verified.VARIANTS.items()
               if variant.verified is None and name.split("_")[1] == family}
    return [b for b in FASTATTN_BACKENDS[device_type] if b in pending]


def names(family: str, device_type: str, inject_failure: bool = False, unverified: bool = False) -> list[str]:
    """The providers of a family on a device, in table order."""
    backends = FASTATTN_BACKENDS[device_type]
    if family == "models":
        # a converted model on the reference backend runs the original layers' own forward: seconds per step
        # spent on a copy of the `timm` column
        backends = tuple(b for b in backends if b != "reference")
    out = [f"fastattn-{b}" for b in backends]
    if unverified:
        out += [f"fastattn-{b}{UNVERIFIED_SUFFIX}" for b in unverified_backends(family, device_type)]
    out += list(OTHERS[family][device_type])
    return out + [INJECTED_FAILURE] if inject_failure else out


def known(family: str, device_type: str, unverified: bool = False) -> list[str]:
    """names() and the providers run only when named (--providers)."""
    out = names(family, device_type, unverified=unverified)
    return out + [n for n in OPTIONAL[family] if n not in out]


def _noop() -> None:
    pass


@dataclass
class Prepared:
    run: Callable[[], object]              # one timed iteration
    clear: Callable[[], None] = _noop      # drop what an iteration leaves behind (grads)
    refill: Callable[[], None] | None = None  # untimed, before each timed call: restore an input the call overwrote
    info: dict = field(default_factory=dict)


class InjectedFailure(RuntimeError):
    pass


class SdpaRefused(RuntimeError):
    """A forced SDPA kernel cannot run the case; the message carries PyTorch's reasons."""


class FlashAttnMissing(ImportError):
    pass


class NothingConverted(RuntimeError):
    """fastattn.convert found no layer to replace: timing the model would time the original."""


def _injected() -> Prepared:
    def run():
        raise InjectedFailure("injected failure: the bench self-test provider (--inject-failure) always fails")
    return Prepared(run)


def fastattn_backend(name: str) -> tuple[str, bool]:
    """'fastattn-cuda-unverified' -> ('cuda', True): the backend, and whether its unverified kernels run."""
    backend = name.removeprefix("fastattn-").removesuffix("-inplace")
    return backend.removesuffix(UNVERIFIED_SUFFIX), backend.endswith(UNVERIFIED_SUFFIX)


@contextlib.contextmanager
def unverified_kernels():
    """FASTATTN_UNVERIFIED_KERNELS=1 while inside: every kernel variant of fastattn._verified on."""
    from fastattn import _verified
    before = os.environ.get(_verified.ENV)
    os.environ[_verified.ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_verified.ENV, None)
        else:
            os.environ[_verified.ENV] = before


def _check_fastattn_backend(family: str, backend: str, like: torch.Tensor) -> str:
    """fastattn.explain raises BackendUnavailable, with the reason, for a backend that cannot run here."""
    import fastattn
    return fastattn.explain(family, like, backend=backend)


def _dtype(case: Case) -> torch.dtype:
    return getattr(torch, case.dtype)


def _seeded(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


# ---------------------------------------------------------------------------
# CBAM
# ---------------------------------------------------------------------------
def cbam_inputs(case: Case, device: torch.device) -> dict:
    from timm.layers.cbam import CbamModule
    n, c, h, w = case.params["shape"]
    autocast = case.params.get("autocast", False)
    torch.manual_seed(0)
    template = CbamModule(c).to(device, torch.float32 if autocast else _dtype(case))
    x = torch.randn(n, c, h, w, device=device, dtype=_dtype(case), generator=_seeded(device))
    train = case.pass_ == "fwd+bwd"
    if train:
        x.requires_grad_(True)
    grad_y = torch.randn_like(x) if train else None
    return {"template": template, "x": x, "grad_y": grad_y, "train": train, "autocast": autocast}


def _module_runner(module: torch.nn.Module, callable_: Callable, inputs: dict) -> Prepared:
    x, grad_y, train = inputs["x"], inputs["grad_y"], inputs["train"]
    # under autocast (the case's x dtype), as a mixed-precision training step calls the layer
    autocast = functools.partial(torch.autocast, x.device.type, dtype=x.dtype, enabled=inputs.get("autocast", False))
    module.train(train)
    if not train:
        def run():
            with torch.no_grad(), autocast():
                return callable_(x)
        return Prepared(run)

    def clear():
        x.grad = None
        module.zero_grad(set_to_none=True)

    def run():
        clear()
        with autocast():
            y = callable_(x)
        y.backward(grad_y)
    return Prepared(run, clear)


def _inplace_runner(module: torch.nn.Module, inputs: dict, why: str) -> Prepared:
    """The block writing y over its own copy of x; the copy is refilled from x before each timed call
    (untimed), as the layer before the block would have written it."""
    if inputs["train"]:
        raise ValueError(f"{INPLACE} is inference only: in-place CBAM refuses calls that want a gradient")
    module.inplace = True
    x = inputs["x"]
    work = x.clone()
    prepared = _module_runner(module, module, {**inputs, "x": work})
    prepared.refill = functools.partial(work.copy_, x)
    prepared.info["backend"] = why
    return prepared


def cbam_provider(name: str, case: Case, inputs: dict, compile_backend: str) -> Prepared:
    template, x = inputs["template"], inputs["x"]
    if is_fastattn(name):
        import fastattn
        backend, _ = fastattn_backend(name)
        why = _check_fastattn_backend("cbam", backend, x)
        module = fastattn.nn.CBAM(template.channel.fc1.in_channels, flavor="timm", backend=backend)
        module = module.to(x.device, template.channel.fc1.weight.dtype)
        module.load_state_dict(template.state_dict())
        if name == INPLACE:
            return _inplace_runner(module, inputs, why)
        prepared = _module_runner(module, module, inputs)
        prepared.info["backend"] = why
        return prepared
    module = copy.deepcopy(template)
    if name == "timm":
        return _module_runner(module, module, inputs)
    if name == "compile":
        return _module_runner(module, torch.compile(module, backend=compile_backend), inputs)
    raise ValueError(f"unknown cbam provider {name!r}")


# ---------------------------------------------------------------------------
# Spatial attention
# ---------------------------------------------------------------------------
def attention_inputs(case: Case, device: torch.device) -> dict:
    p, dtype = case.params, _dtype(case)
    gen = _seeded(device)
    q = torch.randn(p["n"], p["cq"], p["hq"], p["wq"], device=device, dtype=dtype, generator=gen)
    k = torch.randn(p["n"], p["cq"], p["hk"], p["wk"], device=device, dtype=dtype, generator=gen)
    v = torch.randn(p["n"], p["cv"], p["hk"], p["wk"], device=device, dtype=dtype, generator=gen)
    train = case.pass_ == "fwd+bwd"
    for t in (q, k, v):
        t.requires_grad_(train)
    grad_out = torch.randn(p["n"], p["cv"], p["hq"], p["wq"], device=device, dtype=dtype, generator=gen) \
        if train else None
    scale = p["scale"] if p["scale"] is not None else (p["cq"] // p["heads"]) ** -0.5
    return {"q": q, "k": k, "v": v, "grad_out": grad_out, "heads": p["heads"], "scale": scale, "train": train}


def _heads_last(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, C, H, W) -> the strided view (N, heads, L, C/heads) of the same memory."""
    return t.reshape(t.shape[0], heads, t.shape[1] // heads, -1).transpose(-1, -2)


def _to_nchw(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, heads, L, d_v) -> a contiguous (N, heads * d_v, H, W) shaped like the query map."""
    n, heads, _, dv = out.shape
    return out.transpose(-1, -2).reshape(n, heads * dv, *like.shape[2:]).contiguous()


def sdpa_user(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """F.scaled_dot_product_attention as a user calls it on NCHW maps: permute to (N, heads, L, d),
    .contiguous(), SDPA choosing its kernel, permute back to a contiguous map.

    q: (N, Cq, Hq, Wq), k: (N, Cq, Hk, Wk), v: (N, Cv, Hk, Wk) -> (N, Cv, Hq, Wq).
    """
    out = F.scaled_dot_product_attention(*(_heads_last(t, heads).contiguous() for t in (q, k, v)), scale=scale)
    return _to_nchw(out, q)


def sdpa_nchw_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """SDPA on the NCHW maps' strided (N, heads, L, d) views, no copies in: PyTorch takes its math path
    for them (the fused kernels want the head dim contiguous). Provider sdpa-nchw-views, run when named."""
    out = F.scaled_dot_product_attention(*(_heads_last(t, heads) for t in (q, k, v)), scale=scale)
    return _to_nchw(out, q)


def sdpa_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> str | None:
    """The SDPA kernel that sdpa_user's call takes (PyTorch's own choice; private API, None if absent)."""
    from torch.nn.attention import SDPBackend
    try:
        index = torch._fused_sdp_choice(*(_heads_last(t, heads).contiguous() for t in (q, k, v)), scale=scale)
        return SDPBackend(index).name
    except Exception:  # noqa: BLE001 - a private function: absent or changed in another torch
        return None


def _refusal(exc: RuntimeError) -> bool:
    text = str(exc)
    return "No available kernel" in text or "No viable backend" in text


def _warning_text(message: Warning) -> str:
    """One of the reasons PyTorch warns with, without its source location."""
    return re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", " ".join(str(message).split()))


def forced_sdpa(kernel: str) -> Callable:
    """sdpa_user with one SDPA kernel forced (torch.nn.attention.sdpa_kernel). The first call listens to the
    warnings in which PyTorch gives its reasons: a refusal raises SdpaRefused with them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, SDPA_KERNELS[kernel])
    checked = []

    def call(q, k, v, heads, scale):
        with sdpa_kernel(backend):
            return sdpa_user(q, k, v, heads, scale)

    def fn(q, k, v, heads, scale):
        if checked:
            return call(q, k, v, heads, scale)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = call(q, k, v, heads, scale)
            except RuntimeError as exc:
                if not _refusal(exc):
                    raise
                reasons = [_warning_text(w.message) for w in caught]
                if not reasons and q.device.type == "cpu" and kernel in ("efficient", "cudnn"):
                    reasons = [f"PyTorch's CPU SDPA has the flash and math kernels only, no {kernel}"]
                raise SdpaRefused(f"SDPA kernel {kernel} refuses this case: "
                                  + ("; ".join(reasons).replace(":;", ":") or str(exc))) from None
        checked.append(True)
        return out
    return fn


def flash_attn_fn() -> Callable:
    """FlashAttention-2's flash_attn_func on NCHW maps, called as a user would: permute to its
    (N, L, heads, d) layout, contiguous, and back. FlashAttnMissing where the package is absent."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as exc:
        raise FlashAttnMissing(f"flash-attn not installed (the flash-attn package builds from CUDA source; "
                               f"{type(exc).__name__}: {exc})") from None

    def fn(q, k, v, heads, scale):
        # (N, C, H, W) -> (N, L, heads, d)
        q_, k_, v_ = (_heads_last(t, heads).transpose(1, 2).contiguous() for t in (q, k, v))
        return _to_nchw(flash_attn_func(q_, k_, v_, softmax_scale=scale).transpose(1, 2), q)
    return fn


def _attention_fn(name: str, compile_backend: str, inputs: dict) -> tuple[Callable, dict]:
    import fastattn
    from fastattn import eager
    q = inputs["q"]
    if is_fastattn(name):
        backend, _ = fastattn_backend(name)
        why = _check_fastattn_backend("attention", backend, q)
        return (lambda q, k, v, heads, scale: fastattn.spatial_attention(q, k, v, heads=heads, scale=scale,
                                                                        backend=backend)), {"backend": why}
    if name == "eager":
        return (lambda q, k, v, heads, scale: eager.spatial_attention(q, k, v, heads=heads, scale=scale)), {}
    if name == "sdpa":
        args = (inputs[key] for key in ("q", "k", "v", "heads", "scale"))
        return sdpa_user, {"sdpa_kernel": sdpa_choice(*args)}
    if name == "sdpa-nchw-views":
        return sdpa_nchw_views, {}
    if name.removeprefix("sdpa-") in SDPA_KERNELS:
        return forced_sdpa(name.removeprefix("sdpa-")), {}
    if name == "flash-attn":
        return flash_attn_fn(), {}
    if name == "compile":
        compiled = torch.compile(eager.spatial_attention, backend=compile_backend)
        return (lambda q, k, v, heads, scale: compiled(q, k, v, heads=heads, scale=scale)), {}
    raise ValueError(f"unknown attention provider {name!r}")


def attention_provider(name: str, case: Case, inputs: dict, compile_backend: str) -> Prepared:
    q, k, v, heads, scale = (inputs[key] for key in ("q", "k", "v", "heads", "scale"))
    fn, info = _attention_fn(name, compile_backend, inputs)
    if not inputs["train"]:
        def run():
            with torch.no_grad():
                return fn(q, k, v, heads, scale)
        return Prepared(run, info=info)

    def clear():
        q.grad = k.grad = v.grad = None

    def run():
        clear()
        fn(q, k, v, heads, scale).backward(inputs["grad_out"])
    return Prepared(run, clear, info=info)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------
def model_inputs(case: Case, device: torch.device) -> dict:
    import timm
    p = case.params
    torch.manual_seed(0)
    template = timm.create_model(p["arch"], pretrained=False, **p["kwargs"]).to(device)
    gen = _seeded(device)
    images = torch.randn(p["batch"], 3, p["image"], p["image"], device=device, generator=gen)
    labels = torch.randint(0, template.num_classes, (p["batch"],), device=device, generator=gen)
    return {"template": template, "images": images, "labels": labels, "train": case.pass_ == "train"}


def model_provider(name: str, case: Case, inputs: dict, compile_backend: str) -> Prepared:
    template, images, labels = inputs["template"], inputs["images"], inputs["labels"]
    info = {}
    if is_fastattn(name):
        import fastattn
        backend, _ = fastattn_backend(name)
        info["backend"] = "; ".join(_check_fastattn_backend(f, backend, images) for f in ("cbam", "attention"))
        model, report = fastattn.convert(template, backend=backend, return_report=True)
        info["replaced"] = dict(report.replaced)
        info["left_alone"] = [f"{path} ({kind}): {reason}" for path, kind, reason in report.skipped]
        if not report.replaced:
            first = f"; left alone {len(report.skipped)}, first: {info['left_alone'][0]}" if report.skipped else ""
            raise NothingConverted(f"fastattn.convert(backend={backend!r}) replaced no layer{first}")
    elif name == "timm":
        model = copy.deepcopy(template)
    else:
        raise ValueError(f"unknown models provider {name!r}")
    if not inputs["train"]:
        model.eval()

        def infer():
            with torch.no_grad():
                return model(images)
        return Prepared(infer, info=info)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def clear():
        opt.zero_grad(set_to_none=True)

    def step():
        clear()
        F.cross_entropy(model(images), labels).backward()
        opt.step()
    return Prepared(step, clear, info=info)


_FAMILY = {"cbam": (cbam_inputs, cbam_provider), "attention": (attention_inputs, attention_provider),
           "models": (model_inputs, model_provider)}


def make_inputs(case: Case, device: torch.device) -> dict:
    return _FAMILY[case.family][0](case, device)


def prepare(name: str, case: Case, inputs: dict, compile_backend: str = "inductor") -> Prepared:
    if name == INJECTED_FAILURE:
        return _injected()
    if not (is_fastattn(name) and fastattn_backend(name)[1]):
        return _FAMILY[case.family][1](name, case, inputs, compile_backend)
    from fastattn import _verified
    with unverified_kernels():
        prepared = _FAMILY[case.family][1](name, case, inputs, compile_backend)
        prepared.info["kernel_variants"] = _verified.describe()
    run = prepared.run

    def run_unverified():
        with unverified_kernels():
            return run()
    prepared.run = run_unverified
    return prepared
