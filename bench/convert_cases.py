"""Layers of other libraries, original vs fastattn.convert: time and peak tensor memory of one call.

    python -m bench.convert_cases            # the default cases (make bench runs them after python -m bench)
    python -m bench.convert_cases --full     # and the large ones
    python -m bench.convert_cases --quick    # tiny shapes

Each case builds the library's own layer (or model) with random weights, converts a copy with
fastattn.convert (backend "cpu" on the CPU), and times both in one process, alternating calls (medians);
fwd is eval mode under no_grad, fwd+bwd train mode with y.backward(grad_y). Peak memory: the tensor
memory one call takes at its peak (bench.memory.peak_bytes). Writes bench/results/<device>-convert.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from bench import env, memory
from bench.timing import Clock, median, plan_repeats, round_robin


@dataclass(frozen=True)
class ConvertCase:
    library: str
    layer: str
    label: str
    pass_: str                                  # "fwd" or "fwd+bwd"
    build: Callable[[], torch.nn.Module]        # the library's module, random weights
    shape: tuple                                # input shape (latent for the VAE decode)
    call: str = "forward"                       # the module method timed
    fused: str = ""                             # what fastattn fuses there


def _diffusers_vae():
    from diffusers import AutoencoderKL
    # the SD-1.x VAE configuration (random weights: nothing is downloaded)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, norm_num_groups=32, sample_size=512)


def _mmcv_nonlocal(cls_name: str, channels: int = 512, **kwargs):
    def build():
        import mmcv.cnn
        block = getattr(mmcv.cnn, cls_name)(channels, reduction=2, use_scale=True, mode="embedded_gaussian",
                                           norm_cfg=dict(type="BN3d" if cls_name == "NonLocal3d" else "BN"),
                                           **kwargs)
        with torch.no_grad():  # conv_out's norm starts at zero: make the block more than an identity
            block.conv_out.norm.weight.fill_(0.5)
        return block
    return build


def _monai_block(channels: int = 64):
    def build():
        from monai.networks.blocks import SpatialAttentionBlock
        return SpatialAttentionBlock(3, channels, num_head_channels=channels, norm_num_groups=32)
    return build


def _biggan_selfattn(channels: int = 256):
    def build():
        from pytorch_pretrained_biggan.model import SelfAttn
        block = SelfAttn(channels)
        with torch.no_grad():
            block.gamma.fill_(0.5)
        return block
    return build


NL_FUSED = "softmax(theta^T phi) g: the (L x L) weights never stored"


def cases(mode: str) -> list[ConvertCase]:
    if mode == "quick":
        return [ConvertCase("mmcv", "NonLocal2d", "2x16x8x8", "fwd+bwd", _mmcv_nonlocal("NonLocal2d", 16),
                            (2, 16, 8, 8), fused=NL_FUSED)]
    out = [ConvertCase("pytorch_pretrained_biggan", "SelfAttn", "BigGAN-deep-256 2x256x64x64", "fwd",
                       _biggan_selfattn(256), (2, 256, 64, 64), fused="SAGAN attention over 2x2-pooled K/V"),
           ConvertCase("mmcv", "NonLocal2d", "2x512x32x64", "fwd+bwd", _mmcv_nonlocal("NonLocal2d"),
                       (2, 512, 32, 64), fused=NL_FUSED)]
    if mode == "full":
        out += [ConvertCase("diffusers", "Attention (AutoencoderKL)", "SD-1.x VAE decode 1x4x64x64", "fwd",
                            _diffusers_vae, (1, 4, 64, 64), call="decode",
                            fused="mid-block attention, 4096 positions x 512 channels"),
                ConvertCase("mmcv", "NonLocal2d", "NLNet head 2x512x64x128", "fwd+bwd",
                            _mmcv_nonlocal("NonLocal2d"), (2, 512, 64, 128), fused=NL_FUSED),
                ConvertCase("mmcv", "NonLocal3d", "2x512x8x28x28", "fwd+bwd", _mmcv_nonlocal("NonLocal3d"),
                            (2, 512, 8, 28, 28), fused=NL_FUSED),
                ConvertCase("monai", "SpatialAttentionBlock", "3-D 1x64x32x32x32", "fwd", _monai_block(64),
                            (1, 64, 32, 32, 32), fused="attention over 32768 voxels, 1 head of 64")]
    return out


def _runner(module: torch.nn.Module, case: ConvertCase, x: torch.Tensor, grad_y: torch.Tensor | None):
    fn = getattr(module, case.call)
    if case.pass_ == "fwd":
        module.eval()

        def run():
            with torch.no_grad():
                return fn(x)
        return run, lambda: None
    module.train()
    xg = x.clone().requires_grad_(True)

    def clear():
        xg.grad = None
        module.zero_grad(set_to_none=True)

    def run():
        clear()
        fn(xg).backward(grad_y)
    return run, clear


class _Prepared:
    def __init__(self, run, clear):
        self.run, self.clear = run, clear


def run_case(case: ConvertCase, clock: Clock, budget_s: float, min_repeats: int, max_repeats: int,
             measure_memory: bool) -> dict:
    import fastattn
    record = {"library": case.library, "layer": case.layer, "label": case.label, "pass": case.pass_,
              "shape": list(case.shape), "fused": case.fused, "results": {}}
    started = time.perf_counter()
    torch.manual_seed(0)
    original = case.build()
    converted, report = fastattn.convert(original, backend="cpu", return_report=True)
    record["replaced"] = dict(report.replaced)
    record["left_alone"] = [f"{p} ({k}): {r}" for p, k, r in report.skipped]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=g)
    grad_y = None
    if case.pass_ == "fwd+bwd":
        with torch.no_grad():
            grad_y = torch.randn(getattr(original.eval(), case.call)(x).shape, generator=g)
    runners = {"original": _runner(original, case, x, grad_y), "fastattn": _runner(converted, case, x, grad_y)}
    first = 0.0
    for name, (run, _) in runners.items():
        start = time.perf_counter()
        run()  # first call: thread pool, kernels, allocations; not timed
        first += time.perf_counter() - start
        record["results"][name] = {"first_call_s": time.perf_counter() - start}
    repeats = plan_repeats(first, budget_s, min_repeats, max_repeats)
    times, errors = round_robin({name: run for name, (run, _) in runners.items()}, repeats, clock)
    for name, exc in errors.items():
        record["results"][name]["error"] = f"{type(exc).__name__}: {exc}"
    for name, seconds in times.items():
        record["results"][name].update(median_ms=1e3 * median(seconds), times_ms=[1e3 * s for s in seconds])
        if measure_memory:
            record["results"][name]["peak_mem_mib"] = memory.peak_bytes(_Prepared(*runners[name]), clock.device) / 2**20
    res = record["results"]
    if "median_ms" in res["original"] and "median_ms" in res["fastattn"]:
        record["speedup"] = res["original"]["median_ms"] / res["fastattn"]["median_ms"]
        if measure_memory:
            record["memory_ratio"] = res["original"]["peak_mem_mib"] / max(res["fastattn"]["peak_mem_mib"], 1e-9)
    record["wall_s"] = time.perf_counter() - started
    return record


def table(records: list[dict]) -> str:
    lines = ["| library | layer | case | pass | original ms | fastattn ms | speed-up | original MiB | fastattn MiB "
             "| memory ratio |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        o, f = r["results"]["original"], r["results"]["fastattn"]
        cells = [r["library"], r["layer"], r["label"], r["pass"], f"{o.get('median_ms', float('nan')):.1f}",
                 f"{f.get('median_ms', float('nan')):.1f}", f"{r.get('speedup', float('nan')):.2f}x",
                 f"{o.get('peak_mem_mib', float('nan')):.0f}", f"{f.get('peak_mem_mib', float('nan')):.0f}",
                 f"{r.get('memory_ratio', float('nan')):.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.convert_cases", description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="add the large cases")
    size.add_argument("--quick", action="store_true", help="tiny shapes")
    parser.add_argument("--only", help="comma list of case labels (substrings) to run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of timed calls per case (default 30)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full" if args.full else "default"
    chosen = cases(mode)
    if args.only:
        chosen = [c for c in chosen if any(part in c.label for part in args.only.split(","))]
    device = torch.device("cpu")
    clock = Clock(device)
    threads = torch.get_num_threads()
    result = {"schema": "fastattn-bench-convert/1", "mode": mode, "environment": env.environment(device, threads),
              "cases": []}
    min_repeats, max_repeats = (2, 2) if mode == "quick" else (3, 15)
    for case in chosen:
        print(f"{case.library} {case.layer} {case.label} {case.pass_} ...", flush=True)
        record = run_case(case, clock, args.budget, min_repeats, max_repeats, not args.no_memory)
        result["cases"].append(record)
        print(table([record]).splitlines()[-1], flush=True)
    result["environment"]["load_average_end"] = os.getloadavg()[0]
    os.makedirs(args.out, exist_ok=True)
    suffix = "" if mode == "default" else f"-{mode}"
    path = os.path.join(args.out, f"{env.device_name(device, threads)}-convert{suffix}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result["cases"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
