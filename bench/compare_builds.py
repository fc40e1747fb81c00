"""Compares two builds of fastattn._C bit for bit on the CPU CBAM kernels.

    python bench/compare_builds.py build/old/_C.cpython-311-x86_64-linux-gnu.so fastattn/_C.cpython-311-x86_64-linux-gnu.so

Each library runs in its own subprocess (two builds register the same ops and cannot share one
process) with a fixed thread count, on a fixed set of cases: every CBAM op called directly (every
term subset of cbam_grad_x, both tie rules), the functional API and the nn.CBAM flavours in train,
eval and no-grad eval mode with all their gradients; float32, float64, float16, bfloat16; NCHW,
channels_last and other strides; odd shapes, shapes that split rows and lane tiles, tie-heavy
inputs and inputs with inf, NaN and -0. Every output and gradient must have the same dtype, shape,
strides and bits. Exit status 1 when any differs.

The kernels' row chunks depend on the thread count, so results are bitwise equal only for the same
count (--threads). ATEN_CPU_CAPABILITY=avx2 in the environment selects the 8-wide paths on a CPU
with AVX-512.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import itertools
import os
import subprocess
import sys
import tempfile
import zlib

DTYPES = ("float32", "float64", "float16", "bfloat16")
LAYOUTS = ("nchw", "channels_last", "strided")
KINDS = ("randn", "ties", "special")
# odd sizes; one position; > 512 positions (NCHW lane tiles) and > 512 channels (channels_last
# lane tiles); enough rows to split into row chunks
OP_SHAPES = ((2, 5, 7, 9), (3, 3, 1, 1), (1, 8, 23, 29), (2, 37, 6, 11), (1, 600, 3, 5), (2, 300, 12, 12))
MODULE_SHAPES = ((2, 16, 7, 9), (1, 40, 13, 5), (2, 64, 12, 12))
MODULE_FLAVORS = (("timm", {}), ("timm_light", {}), ("official", {}), ("official", {"no_spatial": True}))
MODES = ("train", "eval", "eval-no-grad")
# which of cbam_grad_x's four terms are given: grad_y, grad_pooled, grad_avg, grad_max
GRAD_X_TERMS = [t for t in itertools.product((False, True), repeat=4) if any(t)]


def _load_library(path: str):
    """fastattn._C from `path`, in sys.modules before fastattn is imported (which then uses it)."""
    loader = importlib.machinery.ExtensionFileLoader("fastattn._C", path)
    spec = importlib.util.spec_from_file_location("fastattn._C", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["fastattn._C"] = module


def make(torch, shape, dtype, kind, gen, layout="nchw"):
    """x of `kind`: randn, ties (few distinct values), special (randn with inf, -inf, NaN and -0)"""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "ties":  # few distinct values: ties in every max
        x = torch.randint(-2, 3, shape, generator=gen).double() / 2
    elif kind == "special":
        u = torch.rand(shape, generator=gen)
        x = torch.where(u < 0.02, float("nan"), x)
        x = torch.where((u >= 0.02) & (u < 0.04), float("inf"), x)
        x = torch.where((u >= 0.04) & (u < 0.06), float("-inf"), x)
        x = torch.where((u >= 0.06) & (u < 0.09), -0.0, x)
    x = x.to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # neither NCHW- nor channels_last-contiguous: the copying path
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x

def small(torch, shape, dtype, gen, kind="randn"):
    if kind == "ties":
        return (torch.randint(0, 5, shape, generator=gen).double() / 4).to(dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _cases(torch, results: dict) -> None:
    import fastattn
    from fastattn import functional as F_fa

    ops = torch.ops.fastattn
    dtypes = {name: getattr(torch, name) for name in DTYPES}

    def record(name, value):
        results[name] = value

    for shape, dtype_name, layout, kind in itertools.product(OP_SHAPES, DTYPES, LAYOUTS, KINDS):
        dtype = dtypes[dtype_name]
        tag = f"{shape}/{dtype_name}/{layout}/{kind}"
        gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
        n, c, h, w = shape
        x = make(torch, shape, dtype, kind, gen, layout)
        ch_gate = small(torch, (n, c), dtype, gen, kind)
        sp_gate = torch.rand((n, h, w), generator=gen, dtype=torch.float64).to(dtype)
        grad_y = make(torch, shape, dtype, "randn", gen, layout)
        for split in (True, False):
            avg, mx, ch_arg, ch_cnt = ops.channel_pool(x, split)
            record(f"channel_pool/{tag}/{split}", (avg, mx, ch_arg, ch_cnt))
            pooled, sp_arg, sp_cnt = ops.gated_spatial_pool(x, ch_gate, split)
            record(f"gated_spatial_pool/{tag}/{split}", (pooled, sp_arg, sp_cnt))
            grad_pooled = small(torch, (n, 2, h, w), dtype, gen)
            record(f"gated_spatial_pool_backward_gate/{tag}/{split}",
                   ops.gated_spatial_pool_backward_gate(grad_pooled, x, ch_gate, pooled, sp_arg, sp_cnt, split))
            grad_avg, grad_max = small(torch, (n, c), dtype, gen), small(torch, (n, c), dtype, gen)
            for has_gy, has_pool, has_avg, has_max in GRAD_X_TERMS:
                record(f"cbam_grad_x/{tag}/{split}/{int(has_gy)}{int(has_pool)}{int(has_avg)}{int(has_max)}",
                       ops.cbam_grad_x(x, grad_y if has_gy else None, ch_gate if has_gy or has_pool else None,
                                       sp_gate if has_gy else None, grad_pooled if has_pool else None,
                                       pooled if has_pool else None, sp_arg if has_pool else None,
                                       sp_cnt if has_pool else None, grad_avg if has_avg else None,
                                       grad_max if has_max else None, mx if has_max else None,
                                       ch_arg if has_max else None, ch_cnt if has_max else None, split))
        record(f"cbam_apply/{tag}", ops.cbam_apply(x, ch_gate, sp_gate))
        record(f"cbam_apply_backward/{tag}", ops.cbam_apply_backward(grad_y, x, ch_gate, sp_gate))
        for cin, k in ((1, 3), (2, 7), (2, 5)):
            if layout != "nchw":
                break
            pad = [k // 2, k // 2]
            conv_in = make(torch, (n, cin, h, w), dtype, kind, gen)
            weight = small(torch, (1, cin, k, k), dtype, gen)
            out = ops.cbam_spatial_conv(conv_in, weight, pad)
            record(f"cbam_spatial_conv/{tag}/{cin}/{k}", out)
            record(f"cbam_spatial_conv_weight_grad/{tag}/{cin}/{k}",
                   ops.cbam_spatial_conv_weight_grad(small(torch, out.shape, dtype, gen), conv_in, k, k, pad))
        for light, max_first, spatial, biases in itertools.product((False, True), (False, True), (False, True),
                                                                   (False, True)):
            hidden = max(1, c // 4)
            cin = 1 if light else 2
            args = (small(torch, (hidden, c), dtype, gen) * 0.5, small(torch, (hidden,), dtype, gen) if biases else None,
                    small(torch, (c, hidden), dtype, gen) * 0.5, small(torch, (c,), dtype, gen) if biases else None)
            spatial_args = (None,) * 5
            if spatial:
                spatial_args = (small(torch, (1, cin, 7, 7), dtype, gen) * 0.2,
                                *(torch.randn(1, generator=gen) for _ in range(3)), torch.rand(1, generator=gen) + 0.5)
            record(f"cbam_forward_eval/{tag}/{light}/{max_first}/{spatial}/{biases}",
                   ops.cbam_forward_eval(x, *args, *spatial_args, 1e-5, [3, 3], light, max_first))

        # the functional API with autograd
        for ties in ("split", "first"):
            xg = x.detach().clone().requires_grad_(True)
            gate = ch_gate.detach().clone().requires_grad_(True)
            spg = sp_gate.detach().clone().requires_grad_(True)
            avg, mx = F_fa.channel_pool(xg, ties=ties, backend="cpu")
            pooled = F_fa.gated_spatial_pool(xg, gate, ties=ties, backend="cpu")
            y = F_fa.cbam_apply(xg, gate, spg, backend="cpu")
            loss = ((avg * small(torch, avg.shape, dtype, gen)).sum() + (mx * small(torch, mx.shape, dtype, gen)).sum()
                    + (pooled * small(torch, pooled.shape, dtype, gen)).sum() + (y * grad_y).sum())
            loss.backward()
            record(f"functional/{tag}/{ties}", (avg, mx, pooled, y, xg.grad, gate.grad, spg.grad))

    for shape, dtype_name, layout, kind, (flavor, kwargs) in itertools.product(
            MODULE_SHAPES, DTYPES, LAYOUTS[:2], KINDS, MODULE_FLAVORS):
        dtype = dtypes[dtype_name]
        tag = f"{shape}/{dtype_name}/{layout}/{kind}/{flavor}{'-nospatial' if kwargs else ''}"
        gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
        torch.manual_seed(zlib.crc32(tag.encode()))
        module = fastattn.nn.CBAM(shape[1], reduction=4, flavor=flavor, backend="cpu", **kwargs).to(dtype)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype) * 0.5)
            for name, b in module.named_buffers():
                if name.endswith("running_mean"):
                    b.copy_(torch.randn(b.shape, generator=gen))
                elif name.endswith("running_var"):
                    b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
        x = make(torch, shape, dtype, kind, gen, layout)
        grad_y = make(torch, shape, dtype, "randn", gen, layout)
        for mode in MODES:
            record(f"module/{tag}/{mode}", _run_module(module, x, grad_y, mode))


def _run_module(module, x, grad_y, mode):
    """y, the gradients of x and every parameter, and the float buffers after one call in `mode`."""
    import torch
    module.train(mode == "train")
    x = x.detach().clone().requires_grad_(mode != "eval-no-grad")
    with torch.set_grad_enabled(mode != "eval-no-grad"):
        y = module(x)
    grads = []
    if mode != "eval-no-grad":
        y.backward(grad_y)
        grads = [x.grad] + [p.grad for _, p in module.named_parameters()]
    return (y.detach(), *grads, *(b.clone() for _, b in module.named_buffers() if b.is_floating_point()))


def _child(library: str, out: str, threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    _load_library(library)
    results: dict = {}
    _cases(torch, results)
    torch.save(results, out)


def _flatten(value):
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    return [value]


def _same_bits(torch, a, b) -> str | None:
    """None when a and b are the same tensor bit for bit (dtype, shape, strides, bits), else why not."""
    if a is None or b is None:
        return None if a is None and b is None else "one is None"
    if (a.dtype, a.shape, a.stride()) != (b.dtype, b.shape, b.stride()):
        return f"{a.dtype} {tuple(a.shape)} {a.stride()} vs {b.dtype} {tuple(b.shape)} {b.stride()}"
    if a.is_floating_point():
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        a, b = a.contiguous().view(bits), b.contiguous().view(bits)
    differ = a != b
    if differ.any():
        return f"{int(differ.sum())} of {a.numel()} elements differ"
    return None


def _nan_only(torch, a, b) -> bool:
    """Whether a and b differ only in the sign or payload of NaNs (which NaN an add propagates
    depends on the order of its operands, which the compiler may swap)."""
    if a is None or b is None or not a.is_floating_point() or a.shape != b.shape:
        return False
    return bool((a.isnan() == b.isnan()).all()) and bool(((a == b) | a.isnan()).all())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", nargs="?", help="the reference build's fastattn/_C*.so")
    parser.add_argument("new", nargs="?", help="the build to check")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in both runs (default 2)")
    parser.add_argument("--child", nargs=2, metavar=("LIBRARY", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child, args.threads)
        return 0
    if not (args.old and args.new):
        parser.error("give the two libraries to compare")
    import torch
    here = os.path.dirname(os.path.abspath(__file__))
    os.makedirs(os.path.join(os.path.dirname(here), "build"), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.join(os.path.dirname(here), "build")) as tmp:
        outs = [os.path.join(tmp, f"{i}.pt") for i in range(2)]
        # the two runs side by side: each has its own threads, and the results do not depend on timing
        children = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--threads", str(args.threads),
                                      "--child", os.path.abspath(library), out], cwd=os.path.dirname(here))
                    for library, out in zip((args.old, args.new), outs)]
        if any([child.wait() != 0 for child in children]):  # waits for both
            print("a run failed")
            return 1
        old, new = (torch.load(out) for out in outs)
    if old.keys() != new.keys():
        print(f"case lists differ: {sorted(old.keys() ^ new.keys())[:10]}")
        return 1
    failures, tensors, nan_only_count = [], 0, 0
    for name in old:
        a, b = _flatten(old[name]), _flatten(new[name])
        if len(a) != len(b):
            failures.append(f"{name}: {len(a)} vs {len(b)} outputs")
            continue
        for i, (ta, tb) in enumerate(zip(a, b)):
            tensors += 1
            why = _same_bits(torch, ta, tb)
            if why:
                nan_only = _nan_only(torch, ta, tb)
                failures.append(f"{name}[{i}]: {why}{' (NaN sign or payload only)' if nan_only else ''}")
                nan_only_count += nan_only
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"{len(old)} cases, {tensors} tensors, {args.threads} threads, ATen CPU capability {capability}: "
          f"{'all bitwise equal' if not failures else f'{len(failures)} differ'}"
          f"{f', {nan_only_count} of them only in the sign or payload of NaNs' if failures else ''}")
    by_op: dict[str, int] = {}
    for line in failures:
        by_op[line.split("/")[0]] = by_op.get(line.split("/")[0], 0) + 1
    if by_op:
        print("differing tensors per op: " + ", ".join(f"{op} {n}" for op, n in sorted(by_op.items())))
    for line in failures[:30]:
        print("  " + line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
