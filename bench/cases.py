"""The benchmark cases: shapes of the layers and models people run.

A Case is one measurement: a family ("cbam", "attention", "models"), a group
(rows of one table, panels of one plot), a pass ("fwd", "fwd+bwd", "train",
"infer") and the family's parameters. `sweep` names the swept axis and its value
for the --full sweeps, which are plotted against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

FAMILIES = ("cbam", "attention", "models")
PASSES = {"cbam": ("fwd", "fwd+bwd"), "attention": ("fwd", "fwd+bwd")}

RESNET50_STAGES = ((256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))
# the shapes the README quotes; the default run takes its resident-set readings on these only
MAIN_SHAPES = {"cbam": "8x256x56x56", "attention": "unet 8x320x32x32 h8"}


@dataclass(frozen=True)
class Case:
    family: str
    group: str
    label: str
    pass_: str
    dtype: str = "float32"
    params: dict = field(default_factory=dict, hash=False, compare=False)
    sweep: tuple | None = None  # (axis name, value)

    @property
    def id(self) -> str:
        return f"{self.family}/{self.group}/{self.label}/{self.pass_}/{self.dtype}"


def is_main(case: Case) -> bool:
    return MAIN_SHAPES.get(case.family) == case.label


# ---------------------------------------------------------------------------
# CBAM: x of shape (N, C, H, W), timm CbamModule(C)
# ---------------------------------------------------------------------------
def _cbam(group: str, shape: tuple, dtype: str, sweep=None, autocast: bool = False) -> list[Case]:
    label = "x".join(map(str, shape))
    params = {"shape": shape, "autocast": autocast}
    return [Case("cbam", group, label, p, dtype, params, sweep) for p in PASSES["cbam"]]


# Mixed-precision training: x in the autocast dtype (as an autocast conv leaves it), the module's
# parameters in float32, every provider called under torch.autocast of that dtype.
AUTOCAST_DTYPE = {"cpu": "bfloat16", "cuda": "float16"}


def cbam_cases(mode: str, dtypes: list[str], device_type: str = "cpu") -> list[Case]:
    cases = []
    for dtype in dtypes:
        if mode == "quick":
            cases += _cbam("tiny", (2, 32, 8, 8), dtype)
            continue
        for c, h, w in RESNET50_STAGES:
            cases += _cbam("resnet50-stages", (8, c, h, w), dtype)
        if mode == "full":
            for batch in (1, 32):
                for c, h, w in RESNET50_STAGES:
                    cases += _cbam(f"resnet50-stages-batch{batch}", (batch, c, h, w), dtype)
    if mode == "quick":
        return cases + _cbam("tiny-autocast", (2, 32, 8, 8), AUTOCAST_DTYPE[device_type], autocast=True)
    stages = RESNET50_STAGES if mode == "full" else RESNET50_STAGES[:1]
    for c, h, w in stages:
        cases += _cbam("resnet50-stages-autocast", (8, c, h, w), AUTOCAST_DTYPE[device_type], autocast=True)
    return cases


# ---------------------------------------------------------------------------
# Spatial attention: q (N, Cq, Hq, Wq), k (N, Cq, Hk, Wk), v (N, Cv, Hk, Wk)
# ---------------------------------------------------------------------------
def attention_params(n, cq, cv, hq, wq, hk=None, wk=None, heads=1, scale=None) -> dict:
    hk, wk = hk or hq, wk or wq
    return {"n": n, "cq": cq, "cv": cv, "hq": hq, "wq": wq, "hk": hk, "wk": wk, "heads": heads, "scale": scale}


def _attention(group: str, label: str, params: dict, dtype: str, sweep=None) -> list[Case]:
    return [Case("attention", group, label, p, dtype, params, sweep) for p in PASSES["attention"]]


def _square(n, c, hw, heads=1):
    return attention_params(n, c, c, hw, hw, heads=heads)


# The GPU targets of issue 14, in both 16-bit dtypes on a GPU whatever --dtype says: diffusion U-Net blocks,
# non-local blocks, a VAE mid-block (N, C, H, W, heads)
GPU_TARGETS = {"unet 8x320x32x32 h8": (8, 320, 32, 8), "unet 8x640x16x16 h8": (8, 640, 16, 8),
               "nonlocal 4x64x56x56": (4, 64, 56, 1), "nonlocal 4x512x64x64 h8": (4, 512, 64, 8),
               "vae-mid 1x512x64x64": (1, 512, 64, 1)}
GPU_TARGET_DTYPES = ("float16", "bfloat16")


def attention_cases(mode: str, dtypes: list[str], device_type: str) -> list[Case]:
    cases = []
    if mode != "quick" and device_type == "cuda":
        for dtype in GPU_TARGET_DTYPES:
            for label, (n, c, hw, heads) in GPU_TARGETS.items():
                cases += _attention("gpu-targets", label, _square(n, c, hw, heads), dtype)
    for dtype in dtypes:
        if mode == "quick":
            cases += _attention("tiny", "nonlocal 1x16x8x8", _square(1, 16, 8), dtype)
            cases += _attention("tiny", "sagan 2x16 8x8/4x4", attention_params(2, 2, 8, 8, 8, 4, 4, scale=1.0), dtype)
            cases += _attention("tiny", "heads2 2x32x8x8", _square(2, 32, 8, heads=2), dtype)
            continue
        models = "vision-blocks"
        cases += _attention(models, "nonlocal 4x64x28x28", _square(4, 64, 28), dtype)
        cases += _attention(models, "nonlocal 2x32x56x56", _square(2, 32, 56), dtype)
        # SAGAN at C=64: q, k with C/8 channels, v with C/2, keys 2x2 max-pooled, no scaling
        cases += _attention(models, "sagan 8x64 32x32/16x16", attention_params(8, 8, 32, 32, 32, 16, 16, scale=1.0),
                            dtype)
        cases += _attention(models, "vae-mid 1x512x64x64", _square(1, 512, 64), dtype)
        cases += _attention(models, "unet 8x320x32x32 h8", _square(8, 320, 32, heads=8), dtype)
        if mode == "full":
            # one head of d=64 on the CPU; 4 images x 8 heads on a GPU to fill it
            n, heads = (4, 8) if device_type == "cuda" else (1, 1)
            for hw in (14, 28, 32, 56, 64, 96, 128):
                cases += _attention("sweep-L", f"L={hw * hw} d=64", _square(n, 64 * heads, hw, heads), dtype,
                                    ("L", hw * hw))
            for d in (32, 40, 64, 80, 96, 128, 160, 256, 320, 512):
                cases += _attention("sweep-d", f"d={d} L=1024", _square(n, d * heads, 32, heads), dtype, ("d", d))
    return cases


# ---------------------------------------------------------------------------
# Whole models: timm ResNets with attention layers, original vs fastattn.convert
# ---------------------------------------------------------------------------
MODELS = {
    "resnet18-cbam": ("resnet18", {"block_args": {"attn_layer": "cbam"}}),
    "resnet26-nl": ("resnet26", {"block_args": {"attn_layer": "nl"}}),
    "resnet50-cbam": ("resnet50", {"block_args": {"attn_layer": "cbam"}}),
}


def _model(label: str, pass_: str, batch: int, image: int) -> Case:
    arch, kwargs = MODELS[label]
    return Case("models", "timm-models", label, pass_, "float32",
                {"arch": arch, "kwargs": kwargs, "batch": batch, "image": image})


def model_cases(mode: str, device_type: str) -> list[Case]:
    if mode == "quick":
        return [_model("resnet18-cbam", "train", 2, 32)]
    cases = [_model("resnet18-cbam", "train", 8, 224), _model("resnet26-nl", "train", 8, 224)]
    if mode == "full":
        cases.append(_model("resnet50-cbam", "train", 8, 224))
        infer_batch = 64 if device_type == "cuda" else 8
        cases += [_model(label, "infer", infer_batch, 224) for label in MODELS]
    return cases


def build(mode: str, families: list[str], dtypes: list[str], device_type: str) -> list[Case]:
    cases = []
    if "cbam" in families:
        cases += cbam_cases(mode, dtypes, device_type)
    if "attention" in families:
        cases += attention_cases(mode, dtypes, device_type)
    if "models" in families:
        cases += model_cases(mode, device_type)
    return cases


# ---------------------------------------------------------------------------
# Work per case: what the rate and the % of roofline are computed from
# ---------------------------------------------------------------------------
# x-sized tensors moved by a fused CBAM (DESIGN / issue 3): forward reads x three
# times (channel pool, gated spatial pool, apply) and writes y; the training
# backward reads five x-sized tensors (grad_y and x for the gate grads, x for
# the spatial-pool grad, grad_y and x for dx) and writes dx.
CBAM_TRAFFIC = {"fwd": (4, "3 reads + 1 write of x"),
                "fwd+bwd": (10, "forward 3 reads + 1 write, backward 5 reads + 1 write of x-sized tensors")}
ATTENTION_BACKWARD_FACTOR = 2.5  # backward: 5 matmuls against the forward's 2 (FlashAttention counts the same)


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}[dtype]


def attention_forward_flop(p: dict) -> int:
    """2 * N * heads * Lq * Lk * (d_qk + d_v): the two matmuls Q^T K and P V; with d_qk = d_v = d the
    4 * N * heads * L^2 * d that FlashAttention's benchmarks count."""
    lq, lk = p["hq"] * p["wq"], p["hk"] * p["wk"]
    dqk, dv = p["cq"] // p["heads"], p["cv"] // p["heads"]
    return 2 * p["n"] * p["heads"] * lq * lk * (dqk + dv)


def work(case: Case) -> dict:
    """-> {"unit", "amount", "formula", "roofline"}; roofline names the figure in the run's roofline."""
    if case.family == "cbam":
        n, c, h, w = case.params["shape"]
        factor, what = CBAM_TRAFFIC[case.pass_]
        return {"unit": "byte", "amount": factor * n * c * h * w * _itemsize(case.dtype),
                "formula": f"{factor} x bytes(x): {what}", "roofline": "copy"}
    if case.family == "attention":
        fwd = attention_forward_flop(case.params)
        if case.pass_ == "fwd":
            return {"unit": "flop", "amount": fwd, "formula": "2*N*heads*Lq*Lk*(d_qk+d_v)",
                    "roofline": f"matmul/{case.dtype}"}
        return {"unit": "flop", "amount": int(fwd * (1 + ATTENTION_BACKWARD_FACTOR)),
                "formula": "3.5 x 2*N*heads*Lq*Lk*(d_qk+d_v) (backward = 2.5 x forward)",
                "roofline": f"matmul/{case.dtype}"}
    return {"unit": "image", "amount": case.params["batch"], "formula": "batch size", "roofline": None}
