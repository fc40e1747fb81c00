"""Providers by name, per family. Each prepares one callable per case.

cbam:       fastattn-<backend> (fastattn.nn.CBAM, timm flavour, weights copied
            from the timm module), timm (timm.layers.cbam.CbamModule, eager),
            compile (torch.compile of the timm module).
attention:  fastattn-<backend> (fastattn.spatial_attention), eager
            (fastattn.eager.spatial_attention: bmm-softmax-bmm), sdpa
            (F.scaled_dot_product_attention with the permutes NCHW needs),
            compile (torch.compile of the eager formula).
models:     timm (the original model), fastattn-<backend> (fastattn.convert; the
            compiled backends only).

fastattn backends listed per device whether or not they are built: one that
cannot run is reported as failed, with the reason, never dropped.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from bench.cases import Case

FASTATTN_BACKENDS = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
OTHERS = {"cbam": ("timm", "compile"), "attention": ("eager", "sdpa", "compile"), "models": ("timm",)}
INJECTED_FAILURE = "injected-failure"


def is_fastattn(name: str) -> bool:
    return name.startswith("fastattn-")


def names(family: str, device_type: str, inject_failure: bool = False) -> list[str]:
    backends = FASTATTN_BACKENDS[device_type]
    if family == "models":
        # a converted model on the reference backend runs the original layers' own forward: seconds per step
        # spent on a copy of the `timm` column
        backends = tuple(b for b in backends if b != "reference")
    out = [f"fastattn-{b}" for b in backends] + list(OTHERS[family])
    return out + [INJECTED_FAILURE] if inject_failure else out


def _noop() -> None:
    pass


@dataclass
class Prepared:
    run: Callable[[], object]              # one timed iteration
    clear: Callable[[], None] = _noop      # drop what an iteration leaves behind (grads)
    info: dict = field(default_factory=dict)


class InjectedFailure(RuntimeError):
    pass


class NothingConverted(RuntimeError):
    """fastattn.convert found no layer to replace: timing the model would time the original."""


def _injected() -> Prepared:
    def run():
        raise InjectedFailure("injected failure: the bench self-test provider (--inject-failure) always fails")
    return Prepared(run)


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


def cbam_provider(name: str, case: Case, inputs: dict, compile_backend: str) -> Prepared:
    template, x = inputs["template"], inputs["x"]
    if is_fastattn(name):
        import fastattn
        backend = name.removeprefix("fastattn-")
        why = _check_fastattn_backend("cbam", backend, x)
        module = fastattn.nn.CBAM(template.channel.fc1.in_channels, flavor="timm", backend=backend)
        module = module.to(x.device, template.channel.fc1.weight.dtype)
        module.load_state_dict(template.state_dict())
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


def sdpa_nchw(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """F.scaled_dot_product_attention on NCHW maps, with the permutes that takes.

    q: (N, Cq, Hq, Wq), k: (N, Cq, Hk, Wk), v: (N, Cv, Hk, Wk) -> (N, Cv, Hq, Wq) contiguous.
    """
    n, cq, cv = q.shape[0], q.shape[1], v.shape[1]

    def heads_last(t: torch.Tensor, c: int) -> torch.Tensor:  # (N, C, H, W) -> (N, heads, L, C/heads)
        return t.reshape(n, heads, c // heads, -1).transpose(-1, -2)

    out = F.scaled_dot_product_attention(heads_last(q, cq), heads_last(k, cq), heads_last(v, cv), scale=scale)
    return out.transpose(-1, -2).reshape(n, cv, *q.shape[2:]).contiguous()


def _attention_fn(name: str, compile_backend: str, like: torch.Tensor) -> tuple[Callable, dict]:
    import fastattn
    from fastattn import eager
    if is_fastattn(name):
        backend = name.removeprefix("fastattn-")
        why = _check_fastattn_backend("attention", backend, like)
        return (lambda q, k, v, heads, scale: fastattn.spatial_attention(q, k, v, heads=heads, scale=scale,
                                                                        backend=backend)), {"backend": why}
    if name == "eager":
        return (lambda q, k, v, heads, scale: eager.spatial_attention(q, k, v, heads=heads, scale=scale)), {}
    if name == "sdpa":
        return sdpa_nchw, {}
    if name == "compile":
        compiled = torch.compile(eager.spatial_attention, backend=compile_backend)
        return (lambda q, k, v, heads, scale: compiled(q, k, v, heads=heads, scale=scale)), {}
    raise ValueError(f"unknown attention provider {name!r}")


def attention_provider(name: str, case: Case, inputs: dict, compile_backend: str) -> Prepared:
    q, k, v, heads, scale = (inputs[key] for key in ("q", "k", "v", "heads", "scale"))
    fn, info = _attention_fn(name, compile_backend, q)
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
    return Prepared(run, clear, info)


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
        backend = name.removeprefix("fastattn-")
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
    return Prepared(step, clear, info)


_FAMILY = {"cbam": (cbam_inputs, cbam_provider), "attention": (attention_inputs, attention_provider),
           "models": (model_inputs, model_provider)}


def make_inputs(case: Case, device: torch.device) -> dict:
    return _FAMILY[case.family][0](case, device)


def prepare(name: str, case: Case, inputs: dict, compile_backend: str = "inductor") -> Prepared:
    if name == INJECTED_FAILURE:
        return _injected()
    return _FAMILY[case.family][1](name, case, inputs, compile_backend)
