"""Calls every fastattn kernel once, forward and backward, on small shapes, for bench/gpu_sanitize.sh
to run under NVIDIA's compute-sanitizer: each dtype (float32, float16, bfloat16), each layout the
kernels tell apart (NCHW, channels_last, a strided view, a view at an odd storage offset that rules
out 16-byte vectors; 3-D channel-last attention), lengths that are and are not multiples of the
tiles, and head dims of each CUDA tile geometry (d <= 128, <= 256, <= 512). The fused CBAM module's
training step (cbam_grad_x with every gradient term at once) and eval forward run too.

Each result is checked loosely against the reference backend in float64, so a kernel that runs
clean under the sanitizer but computes garbage (a race) still fails. Prints one line per case and
exits 1 if any case failed.

    python bench/gpu_sanitize_driver.py --device cuda --backends cuda,triton
    python bench/gpu_sanitize_driver.py --device cpu --backends cpu,reference   # the same cases, here

FASTATTN_UNVERIFIED_KERNELS (fastattn/_verified.py) picks which kernel variants run; the sanitizer
script runs the driver with and without it. FASTATTN_TRITON_AUTOTUNE defaults to 0 here: one
config per kernel, not a sanitized run of every autotuning candidate.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import fastattn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# DESIGN's error rule, loosely: |fused - float64 truth| <= 2 |eager - truth| + ATOL, relative to
# max(1, |truth|), where eager is the reference backend in the same dtype on the same device. The parity
# tests hold the real tolerances; this catches garbage (races, stray reads) that runs clean.
ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _layouts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """t (N, C, H, W) in every memory layout the CBAM kernels tell apart."""
    n, c, h, w = t.shape
    wide = torch.zeros(n, c, h, w + 3, dtype=t.dtype, device=t.device)
    wide[..., 1:w + 1] = t
    odd = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
    odd[1:] = t.flatten()
    return {"nchw": t.contiguous(), "channels_last": t.contiguous(memory_format=torch.channels_last),
            "strided": wide[..., 1:w + 1], "offset1": odd[1:].view(n, c, h, w)}


def _max_rel_err(got, truth) -> float:
    if not truth.numel():
        return 0.0
    return (got.detach().cpu().double() - truth).abs().max().item() / max(1.0, truth.abs().max().item())


class Runner:
    def __init__(self, device: str):
        self.device = device
        self.failed: list[str] = []
        self.count = 0

    def case(self, name: str, fn, inputs: list[torch.Tensor], grad: bool = True) -> None:
        """fn(*inputs, which) forward (and backward, with grad) for which = "fused" (the backend under
        test), "eager" (the reference backend, same dtype and device) and "truth" (reference, float64, CPU)."""
        self.count += 1
        try:
            fused = self._run(fn, inputs, "fused", grad)
            if self.device == "cuda":
                torch.cuda.synchronize()  # a kernel's fault is reported at this case, not a later one
            eager = self._run(fn, inputs, "eager", grad)
            truth = self._run(fn, [t.detach().cpu().double() for t in inputs], "truth", grad)
            fused_err = max(_max_rel_err(f, t) for f, t in zip(fused, truth))
            eager_err = max(_max_rel_err(e, t) for e, t in zip(eager, truth))
            ok = fused_err <= 2 * eager_err + ATOL[inputs[0].dtype]
            if not ok:
                self.failed.append(name)
            print(f"{'ok  ' if ok else 'FAIL'} {name}: max rel err {fused_err:.2e} (eager {eager_err:.2e})", flush=True)
        except Exception as exc:  # noqa: BLE001  (reported per case; the run goes on)
            self.failed.append(name)
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:500]}", flush=True)

    @staticmethod
    def _run(fn, inputs, which, grad) -> list[torch.Tensor]:
        """Outputs, then the gradients of every input for fixed cotangents."""
        leaves = [t.detach().requires_grad_(grad) for t in inputs]
        with torch.set_grad_enabled(grad):
            outs = fn(*leaves, which)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if not grad:
            return list(outs)
        g = torch.Generator().manual_seed(0)
        cots = [torch.randn(o.shape, generator=g).to(device=o.device, dtype=o.dtype) for o in outs]
        return list(outs) + list(torch.autograd.grad(outs, leaves, cots))


def cbam_op_cases(run: Runner, backend: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    # (2, 5, 7, 9): no dimension a multiple of a vector; (2, 16, 8, 8): 16-byte vectors where aligned
    for shape in ((2, 5, 7, 9), (2, 16, 8, 8)):
        n, c, h, w = shape
        base = torch.randn(shape, generator=g).relu().to(dtype)  # ties in the max pools
        # gates of powers of two: x * gate is exact in every dtype, so the max pools' ties (and where
        # their gradients go) are the float64 truth's
        ch = (2.0 ** torch.randint(-2, 2, (n, c), generator=g)).to(run.device, dtype)
        sp = torch.rand(n, h, w, generator=g).to(run.device, dtype)
        for layout, x in _layouts(base.to(run.device)).items():
            tag = f"{backend} {dtype} {layout} x{shape}"
            for ties in ("split", "first"):
                def pool(a, which, ties=ties):
                    return fastattn.channel_pool(a, ties=ties, backend=_backend(which, backend))

                def gated(a, b, which, ties=ties):
                    return fastattn.gated_spatial_pool(a, b, ties=ties, backend=_backend(which, backend))
                run.case(f"channel_pool ties={ties} {tag}", pool, [x])
                run.case(f"gated_spatial_pool ties={ties} {tag}", gated, [x, ch])

            def apply(a, b, s, which):
                return fastattn.cbam_apply(a, b, s, backend=_backend(which, backend))
            run.case(f"cbam_apply {tag}", apply, [x, ch, sp])


def attention_cases(run: Runner, backend: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    # (dqk, dv, heads, Lq, Lk): every CUDA tile geometry (max head dim <= 128, 256, 512), dqk != dv,
    # lengths off the tiles and a multiple of 16 (Triton's unmasked full tiles)
    shapes = [(16, 16, 1, 37, 50), (40, 40, 2, 64, 64), (16, 40, 2, 33, 17), (160, 160, 1, 20, 29),
              (320, 320, 1, 17, 16), (80, 320, 1, 18, 21)]
    if backend == "triton":  # every shape, dtype and layout is a Triton compile: the cases that differ most
        shapes = [shapes[0], shapes[1], shapes[-1]]
    for dqk, dv, heads, lq, lk in shapes:
        q = torch.randn(1, dqk * heads, lq, generator=g)
        k = torch.randn(1, dqk * heads, lk, generator=g)
        v = torch.randn(1, dv * heads, lk, generator=g)

        def attend(a, b, c, which, heads=heads):
            return fastattn.spatial_attention(a, b, c, heads=heads, backend=_backend(which, backend))
        to = dict(device=run.device, dtype=dtype)
        tag = f"{backend} {dtype} dqk={dqk} dv={dv} heads={heads} Lq={lq} Lk={lk}"
        run.case(f"spatial_attention 3-D {tag}", attend, [t.to(**to) for t in (q, k, v)])
        channel_last = [t.to(**to).transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
        run.case(f"spatial_attention 3-D channel-last {tag}", attend, channel_last)
        if backend != "triton":
            strided = [torch.cat([t, t], 1).to(**to)[:, ::2] for t in (q, k, v)]
            run.case(f"spatial_attention 3-D strided {tag}", attend, strided)
        if lq == lk == 64:  # a 4-D map of 8 x 8 positions
            run.case(f"spatial_attention 4-D {tag}", attend, [t.to(**to).view(1, -1, 8, 8) for t in (q, k, v)])


def cbam_module_cases(run: Runner, backend: str, dtype: torch.dtype) -> None:
    """The fused block's training step (cbam_grad_x with all terms, the gate gradients) and its eval
    forward, with autograd and without (one op on the cpu backend)."""
    x = torch.randn(2, 16, 7, 9, generator=torch.Generator().manual_seed(4)).relu().to(run.device, dtype)
    for flavor in ("timm", "official"):
        for mode in ("train", "eval", "eval no-grad"):
            torch.manual_seed(3)
            fused = fastattn.nn.CBAM(16, 4, flavor=flavor, backend=backend).to(run.device, dtype)
            blocks = {"fused": fused, "eager": fastattn.nn.CBAM(16, 4, flavor=flavor, backend="reference"),
                      "truth": fastattn.nn.CBAM(16, 4, flavor=flavor, backend="reference")}
            blocks["eager"].to(run.device, dtype).load_state_dict(fused.state_dict())
            blocks["truth"].double().load_state_dict(fused.state_dict())
            for block in blocks.values():
                block.train(mode == "train")
            run.case(f"CBAM module {flavor} {mode} {backend} {dtype}", lambda a, which: blocks[which](a), [x],
                     grad=mode != "eval no-grad")


def _backend(which: str, backend: str) -> str:
    return backend if which == "fused" else "reference"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--backends", default=None, help="comma-separated (default: cuda,triton on cuda; cpu on cpu)")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--families", default="cbam,attention,module",
                        help="comma-separated: cbam (the three primitives), attention, module (the fused CBAM block)")
    args = parser.parse_args(argv)
    # read when the Triton kernels are first imported, lazily, at the first Triton call
    os.environ.setdefault("FASTATTN_TRITON_AUTOTUNE", "0")
    backends = (args.backends or ("cuda,triton" if args.device == "cuda" else "cpu")).split(",")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", flush=True)
        return 2
    run = Runner(args.device)
    start = time.time()
    unverified = os.environ.get("FASTATTN_UNVERIFIED_KERNELS", "")
    print(f"driver: device {args.device}, backends {backends}, FASTATTN_UNVERIFIED_KERNELS={unverified!r}, "
          f"torch {torch.__version__}", flush=True)
    families = {"cbam": cbam_op_cases, "attention": attention_cases, "module": cbam_module_cases}
    for backend in backends:
        for dtype_name in args.dtypes.split(","):
            for family in args.families.split(","):
                families[family](run, backend, DTYPES[dtype_name])
    print(f"driver: {run.count} cases, {len(run.failed)} failed, {time.time() - start:.1f} s", flush=True)
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
