"""Runs the CPU kernels on fixed inputs and saves the results; tests/test_cpu_tuning.py starts it in a
fresh process per FASTATTN_CPU_CACHE value (the cache sizes are read once per process).

    python tests/_cache_worker.py OUT.pt

OUT.pt: {"tuning": fastattn.cpu_tuning(), "results": {name: (fused, truth, eager)}, "bitwise": {name:
tensor}}: truth the float64 original and eager the float32 one (the error rule's three tensors);
bitwise the results that no summation order reaches, equal for every tile size."""
import copy
import sys

import torch
from timm.layers.cbam import CbamModule

import fastattn
from fastattn import reference
from _util import randomize

torch.set_num_threads(2)

# odd sizes, so that every tile and piece has a ragged edge: 1073 and 5775 lanes per channel (past
# the largest lane tile and scan piece), 300 and 1030 channels per position in channel-last rows
CBAM_SHAPES = [(3, 40, 37, 29, False), (2, 6, 75, 77, False), (2, 300, 9, 11, True), (3, 1030, 5, 3, True)]
# (N, C, H, W, heads): d = 12 and 128, lengths past the largest stream block and row tile
ATTENTION_SHAPES = [(2, 24, 13, 29, 2), (1, 128, 23, 27, 1)]


def _forward_backward(module, x, grad_y):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(grad_y)
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()]


def cbam_results(results):
    for i, (n, c, h, w, channels_last) in enumerate(CBAM_SHAPES):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(n, c, h, w, generator=g).relu().round(decimals=1)  # ties in every max
        grad_y = torch.randn(n, c, h, w, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for flavor in ("timm", "official"):
            original = (CbamModule(c, rd_ratio=0.25) if flavor == "timm" else reference.OfficialCBAM(c, 4))
            randomize(original, seed=i)
            fused = fastattn.nn.CBAM(c, 4, flavor=flavor, backend="cpu")
            fused.load_state_dict(original.state_dict())
            truth_module = copy.deepcopy(original).double()
            tag = f"{flavor}-{n}x{c}x{h}x{w}-{'nhwc' if channels_last else 'nchw'}"
            # train: the forward and backward kernels
            fused_out = _forward_backward(fused, x, grad_y)
            truth_out = _forward_backward(truth_module, x.double(), grad_y.double())
            eager_out = _forward_backward(copy.deepcopy(original), x, grad_y)
            for k, (f, t, e) in enumerate(zip(fused_out, truth_out, eager_out)):
                # k = 0: y, 1: x's gradient, 2 on: the parameters' (held to GRAD_ATOL, see tests/_contract.py)
                part = "y" if k == 0 else "grad-x" if k == 1 else f"grad-param{k - 2}"
                results[f"train-{tag}-{part}"] = (f, t, e)
            # eval without grad: the one-op inference forward (cbam_forward_eval)
            fused.eval(), original.eval(), truth_module.eval()
            with torch.no_grad():
                results[f"eval-{tag}-y"] = (fused(x), truth_module(x.double()), original(x))


def order_free_results(bitwise):
    """Results whose value does not depend on a summation order: max, its first index and its ties."""
    ops = torch.ops.fastattn
    for i, (n, c, h, w, channels_last) in enumerate(CBAM_SHAPES):
        g = torch.Generator().manual_seed(300 + i)
        x = torch.randn(n, c, h, w, generator=g).relu().round(decimals=1)
        gate = torch.rand(n, c, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        tag = f"{n}x{c}x{h}x{w}-{'nhwc' if channels_last else 'nchw'}"
        _, mx, argmax, count = ops.channel_pool(x, True)
        pooled, p_argmax, p_count = ops.gated_spatial_pool(x, gate, True)
        bitwise.update({f"channel_pool-{tag}-max": mx, f"channel_pool-{tag}-argmax": argmax,
                        f"channel_pool-{tag}-count": count, f"gated_spatial_pool-{tag}-max": pooled[:, 1],
                        f"gated_spatial_pool-{tag}-argmax": p_argmax, f"gated_spatial_pool-{tag}-count": p_count})


def attention_results(results):
    for i, (n, c, h, w, heads) in enumerate(ATTENTION_SHAPES):
        g = torch.Generator().manual_seed(200 + i)
        q, k, v, grad_out = (torch.randn(n, c, h, w, generator=g) for _ in range(4))
        outs = {}
        for label, dtype, backend in (("fused", torch.float32, "cpu"), ("truth", torch.float64, "reference"),
                                      ("eager", torch.float32, "reference")):
            args = [t.detach().to(dtype).clone().requires_grad_(True) for t in (q, k, v)]
            out = fastattn.spatial_attention(*args, heads=heads, backend=backend)
            out.backward(grad_out.to(dtype))
            outs[label] = [out.detach()] + [a.grad for a in args]
        for j, name in enumerate(("out", "dq", "dk", "dv")):
            results[f"attention-{n}x{c}x{h}x{w}-h{heads}-{name}"] = tuple(outs[k][j] for k in ("fused", "truth", "eager"))


if __name__ == "__main__":
    torch.manual_seed(0)
    results = {}
    cbam_results(results)
    attention_results(results)
    bitwise = {}
    order_free_results(bitwise)
    torch.save({"tuning": fastattn.cpu_tuning(), "results": results, "bitwise": bitwise}, sys.argv[1])
