"""One rank of the DistributedDataParallel test (tests/test_convert.py): the
original resnet18-cbam and its converted copies, each wrapped in DDP over gloo,
train side by side on this rank's share of the same batches; after every
all-reduce the gradients of each converted copy must agree with the original's,
and be the same on every rank. After each SGD step the converted copies take
the original's weights and buffers again: the comparison is of gradients, not
of two chaotic float32 trajectories (test_convert.py compares the losses of
free-running copies).

The models and batches are float64 (DTYPE). In float32 the comparison is
ill-posed: the converted copy's forward differs from the original's in the last
bits (within the error rule), and a ReLU input that lands within that rounding
of zero takes one side of the kink in one model and the other side in the other,
which changes that element's gradient by O(1) and every gradient upstream of it.
Seen on an AVX2 machine: the input of layer2.1.act1 at one element was +1.8e-7
in timm's float32 forward, -1.6e-7 in the converted copy's and -6.4e-7 in
float64, and conv1.weight's gradient differed by 4.5e-3 (max |grad| 0.5). Max
pools are kinks too. In float64 the rounding is 1e-16 and the gradients agree
to GRAD_ATOL[float64]; the float32 kernels' gradients are held to the error
rule against float64 truth in test_train_step_matches, on a fixed batch."""
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

STEPS = 3
LR = 0.05
DTYPE = torch.float64  # see the module's docstring


def model():
    import timm
    torch.manual_seed(0)  # the same initial weights on every rank
    return timm.create_model("resnet18", pretrained=False, num_classes=10, block_args=dict(attn_layer="cbam"),
                             zero_init_last=False).to(DTYPE)


def batches(rank: int):
    """This rank's share of each step's batch: (x, target) for each of STEPS steps."""
    gen = torch.Generator().manual_seed(1000 + rank)
    return [(torch.randn(2, 3, 64, 64, generator=gen, dtype=DTYPE), torch.randint(0, 10, (2,), generator=gen))
            for _ in range(STEPS)]


def assert_gradients_match(grads: dict, grads_original: dict, where: str) -> float:
    """Each parameter's gradient within GRAD_ATOL[DTYPE] · max(1, max |original's|) of the original's;
    returns the largest difference."""
    from _contract import GRAD_ATOL
    worst = 0.0
    for name, g_orig in grads_original.items():
        diff = (grads[name] - g_orig).abs().max().item()
        bound = GRAD_ATOL[DTYPE] * max(1.0, g_orig.abs().max().item())
        assert diff <= bound, f"{where} grad {name}: |converted - original| {diff:.3e} > {bound:.1e}"
        worst = max(worst, diff)
    return worst


def run(rank: int, world_size: int, port: int, out_dir: str, paths: list) -> None:
    """paths: the fused paths to check, "auto" and/or "contract-ops" (see test_convert.py)."""
    import fastattn
    from _util import run_fused_on_reference_ops
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        original = model()
        models = {"original": DDP(original)}
        for path in paths:
            converted = fastattn.convert(original)
            models[path] = DDP(run_fused_on_reference_ops(converted) if path == "contract-ops" else converted)
        optims = {k: torch.optim.SGD(m.parameters(), lr=LR) for k, m in models.items()}
        report = []
        for step, (x, target) in enumerate(batches(rank)):  # each rank its own share of the batch
            grads, losses = {}, {}
            for key, ddp_model in models.items():
                optims[key].zero_grad()
                loss = F.cross_entropy(ddp_model(x), target)
                loss.backward()  # DDP all-reduces (averages) the gradients here
                losses[key] = loss.item()
                grads[key] = {n: p.grad.detach().clone() for n, p in ddp_model.module.named_parameters()}
                optims[key].step()
            for path in paths:  # in place: DDP keeps its parameters
                models[path].module.load_state_dict(models["original"].module.state_dict())
            worst = {}
            for path in paths:
                worst[path] = assert_gradients_match(grads[path], grads["original"], f"rank {rank} step {step} {path}")
                # all-reduced gradients are the same on every rank
                flat = torch.cat([g.flatten() for g in grads[path].values()])
                gathered = [torch.empty_like(flat) for _ in range(world_size)]
                dist.all_gather(gathered, flat)
                assert all(torch.equal(gathered[0], g) for g in gathered), f"step {step}: ranks disagree"
            report.append({"step": step, "losses": losses, "max_grad_diff": worst})
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()
