"""One rank of the DistributedDataParallel test (tests/test_convert.py): the
original resnet18-cbam and its converted copies, each wrapped in DDP over gloo,
train side by side on this rank's share of the same batches; after every
all-reduce the gradients of each converted copy must agree with the original's,
and be the same on every rank. After each SGD step the converted copies take
the original's weights and buffers again: the comparison is of gradients, not
of two chaotic float32 trajectories (test_convert.py compares the losses of
free-running copies)."""
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

STEPS = 3


def _model():
    import timm
    torch.manual_seed(0)  # the same initial weights on every rank
    return timm.create_model("resnet18", pretrained=False, num_classes=10, block_args=dict(attn_layer="cbam"),
                             zero_init_last=False)


def run(rank: int, world_size: int, port: int, out_dir: str, paths: list) -> None:
    """paths: the fused paths to check, "auto" and/or "contract-ops" (see test_convert.py)."""
    import fastattn
    from _util import run_fused_on_reference_ops
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        original = _model()
        models = {"original": DDP(original)}
        for path in paths:
            converted = fastattn.convert(original)
            models[path] = DDP(run_fused_on_reference_ops(converted) if path == "contract-ops" else converted)
        optims = {k: torch.optim.SGD(m.parameters(), lr=0.05) for k, m in models.items()}
        gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own share of the batch
        report = []
        for step in range(STEPS):
            x = torch.randn(2, 3, 64, 64, generator=gen)
            target = torch.randint(0, 10, (2,), generator=gen)
            grads, losses = {}, {}
            for key, model in models.items():
                optims[key].zero_grad()
                loss = F.cross_entropy(model(x), target)
                loss.backward()  # DDP all-reduces (averages) the gradients here
                losses[key] = loss.item()
                grads[key] = {n: p.grad.detach().clone() for n, p in model.module.named_parameters()}
                optims[key].step()
            for path in paths:  # in place: DDP keeps its parameters
                models[path].module.load_state_dict(models["original"].module.state_dict())
            worst = {}
            for path in paths:
                worst[path] = 0.0
                for name, g_orig in grads["original"].items():
                    diff = (grads[path][name] - g_orig).abs().max().item()
                    bound = 1e-3 * g_orig.abs().max().item() + 1e-6
                    assert diff <= bound, (f"rank {rank} step {step} {path} grad {name}: "
                                           f"|converted - original| {diff:.3e} > {bound:.1e}")
                    worst[path] = max(worst[path], diff)
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
