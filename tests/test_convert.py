"""fastattn.convert on whole models: timm resnets with CBAM, light CBAM and
non-local blocks against the originals (eval outputs; train-mode outputs, BN
running statistics and every gradient; a short SGD run), state_dict round
trips, the report, torch.compile(fullgraph=True), torch.export, autocast and
DistributedDataParallel.

Each model comparison runs two fused paths: "auto" (what a user gets: the
kernels of this machine, or the original forward where none are built) and
"contract-ops" (the fused modules' own code over the op contract written in
PyTorch, which exercises that code even where no kernel is built)."""
import copy
import json
import logging
import socket
import time

import pytest
import timm
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.layers.cbam import CbamModule, LightCbamModule
from timm.layers.non_local_attn import BatNonLocalAttn, NonLocalAttn
from torch import nn

import fastattn
from fastattn import _backend, reference
from _util import (ATOL, GRAD_ATOL, assert_error_rule, assert_same_state_dict, run_fused_on_reference_ops,
                   saved_state_dict)

# key -> (timm model, attn_layer, the type convert replaces, how many)
MODELS = {
    "resnet18-cbam": ("resnet18", "cbam", "CbamModule", 8),
    "resnet26-nl": ("resnet26", "nl", "NonLocalAttn", 8),
    "resnet18-lcbam": ("resnet18", "lcbam", "LightCbamModule", 8),
}
INPUT = (2, 3, 64, 64)


def _timm_model(key: str, seed: int = 0) -> nn.Module:
    name, attn, _, _ = MODELS[key]
    torch.manual_seed(seed)
    # zero_init_last=False: otherwise the last BN of each block is zero and the attention sees zeros.
    # act_layer="gelu": a smooth activation between the blocks. With ReLU, a forward result a few ulp
    # off (well within the error rule) can land on the other side of a kink at some pre-activation
    # 1e-6 from zero and change that element's gradient by O(1): seen at layer3.1.act1 of
    # resnet18-lcbam. The attention layers keep their own ReLU.
    model = timm.create_model(name, pretrained=False, num_classes=10, block_args=dict(attn_layer=attn),
                              zero_init_last=False, act_layer="gelu")
    with torch.no_grad():  # the non-local blocks start as identities (BN gamma 0): give them a say
        for m in model.modules():
            if isinstance(m, NonLocalAttn):
                m.norm.weight.normal_(0, 0.5)
    return model


def _converted(model: nn.Module, path: str) -> nn.Module:
    converted = fastattn.convert(model)
    return run_fused_on_reference_ops(converted) if path == "contract-ops" else converted


def _batch(seed: int = 0, shape=INPUT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)


PATHS = ["auto", "contract-ops"]


def _model_paths() -> list[str]:
    """The paths worth a whole-model comparison: "auto" is the original forward itself
    until some fused kernel exists on this machine."""
    kernels = any(_backend.choose(family, torch.device("cpu"), torch.float32)[0] != "reference"
                  for family in ("cbam", "attention"))
    return PATHS if kernels else ["contract-ops"]


@pytest.mark.parametrize("key", list(MODELS))
def test_eval_outputs_match(key):
    original = _timm_model(key).eval()
    truth = copy.deepcopy(original).double()
    x, _ = _batch()
    with torch.no_grad():
        y_eager, y_truth = original(x), truth(x.double())
        for path in _model_paths():
            assert_error_rule(f"{path} logits", _converted(original, path)(x), y_truth, y_eager)


def _train_step(model: nn.Module, x, target):
    model.train()
    model.zero_grad()
    out = model(x)
    F.cross_entropy(out, target).backward()
    return out


@pytest.mark.parametrize("key", list(MODELS))
def test_train_step_matches(key):
    """Train mode: outputs, BN running statistics and every parameter gradient after one step."""
    original = _timm_model(key)
    truth = copy.deepcopy(original).double()
    fused = {path: _converted(original, path) for path in _model_paths()}
    x, target = _batch()
    y_eager = _train_step(original, x, target)
    y_truth = _train_step(truth, x.double(), target)
    buffers_eager, buffers_truth = dict(original.named_buffers()), dict(truth.named_buffers())
    grads_eager = {n: p.grad for n, p in original.named_parameters()}
    grads_truth = {n: p.grad for n, p in truth.named_parameters()}
    for path, model in fused.items():
        y = _train_step(model, x, target)
        assert_error_rule(f"{path} logits", y, y_truth, y_eager)
        buffers = dict(model.named_buffers())
        assert buffers.keys() == buffers_eager.keys()
        for name, b in buffers.items():
            if b.is_floating_point():
                assert_error_rule(f"{path} buffer {name}", b, buffers_truth[name], buffers_eager[name])
            else:
                assert torch.equal(b, buffers_eager[name]), f"{path} buffer {name}"
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert grads.keys() == grads_eager.keys()
        for name, g in grads.items():
            assert g is not None, f"{path}: no gradient for {name}"
            assert_error_rule(f"{path} grad {name}", g, grads_truth[name], grads_eager[name], atol=GRAD_ATOL[g.dtype])


def test_sgd_five_steps_losses_agree():
    original = _timm_model("resnet18-cbam")
    models = {"original": original, **{path: _converted(original, path) for path in _model_paths()}}
    losses = {}
    for label, model in models.items():
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses[label] = []
        for step in range(5):
            x, target = _batch(seed=100 + step, shape=(2, 3, 48, 48))  # the same synthetic stream for every model
            loss = F.cross_entropy(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[label].append(loss.item())
    assert len(set(losses["original"])) > 1, losses
    for path in _model_paths():
        for step, (lf, lo) in enumerate(zip(losses[path], losses["original"])):
            assert abs(lf - lo) <= 1e-3 * max(1.0, abs(lo)), f"{path} step {step}: {losses[path]} vs {losses['original']}"


@pytest.mark.parametrize("key", list(MODELS))
def test_state_dict_round_trip(key):
    original = _timm_model(key).eval()
    converted = fastattn.convert(original)
    assert_same_state_dict(original, converted)
    # a checkpoint saved before conversion loads after it, and the other way round
    into_converted = fastattn.convert(_timm_model(key, seed=1)).eval()
    into_converted.load_state_dict(saved_state_dict(original))
    into_original = _timm_model(key, seed=2).eval()
    into_original.load_state_dict(saved_state_dict(converted))
    x, _ = _batch()
    with torch.no_grad():
        y = original(x)
        torch.testing.assert_close(into_converted(x), y)
        torch.testing.assert_close(into_original(x), y)


def test_report_inplace_and_idempotence(caplog):
    for key, (_, _, type_name, count) in MODELS.items():
        model = _timm_model(key)
        with caplog.at_level(logging.INFO, logger="fastattn"):
            converted, report = fastattn.convert(model, return_report=True)
        assert dict(report.replaced) == {type_name: count}, str(report)
        assert f"{count} x {type_name}" in str(report) and f"{count} x {type_name}" in caplog.text
        assert not report.skipped
        assert converted is not model and type(model.layer1[0].se) is not type(converted.layer1[0].se)
        _, again = fastattn.convert(converted, return_report=True)
        assert sum(again.replaced.values()) == 0

    model = nn.Sequential(CbamModule(16, act_layer=nn.SiLU), BatNonLocalAttn(16), LightCbamModule(16),
                          reference.SelfAttention2d(16), reference.AttentionBlock2d(32, 4, groups=8),
                          reference.NonLocal2d(16), reference.TimmNonLocalAttn(16), NonLocalAttn(16))
    same, report = fastattn.convert(model, inplace=True, backend="reference", return_report=True)
    assert same is model
    assert dict(report.replaced) == {"LightCbamModule": 1, "SelfAttention2d": 1, "AttentionBlock2d": 1,
                                     "NonLocal2d": 1, "TimmNonLocalAttn": 1, "NonLocalAttn": 1}
    skipped = {path: (name, reason) for path, name, reason in report.skipped}
    assert skipped["0"][0] == "CbamModule" and "SiLU" in skipped["0"][1]
    assert skipped["1"][0] == "BatNonLocalAttn" and "no softmax attention" in skipped["1"][1]
    assert isinstance(model[0], CbamModule) and isinstance(model[2], fastattn.nn.CBAM)
    assert isinstance(model[7], fastattn.nn.NonLocalAttn) and model[7].backend == "reference"
    with pytest.raises(ValueError, match="backend"):
        fastattn.convert(model, backend="nope")

    class MyCbam(CbamModule):
        pass
    _, report = fastattn.convert(nn.Sequential(MyCbam(16)), return_report=True)
    assert not report.replaced and "a subclass of CbamModule" in report.skipped[0][2]


# --------------------------------------------------------------------------
# torch.compile, torch.export, autocast: one small model holding every fused type
# --------------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(CbamModule(32, rd_ratio=1 / 4), LightCbamModule(32, rd_ratio=1 / 4),
                                    NonLocalAttn(32), reference.SelfAttention2d(32),
                                    reference.AttentionBlock2d(32, 2, groups=8),
                                    reference.NonLocal2d(32, sub_sample=True))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    model = _Tiny()
    with torch.no_grad():  # every block starts as an identity: give each attention a say
        for name, p in model.named_parameters():
            if name.endswith("gamma") or "norm.weight" in name or "proj_out" in name:
                p.normal_(0, 0.5)
    return model


def _fwd_bwd(model, x, run=None):
    """run(x) (model itself, or a compiled wrapper of it) forward and backward -> output, model's grads."""
    model.zero_grad()
    y = (model if run is None else run)(x)
    y.square().mean().backward()
    return y, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("path", PATHS)
def test_compile_fullgraph_no_graph_break(path):
    x = torch.randn(2, 3, 16, 16)
    for train in (True, False):
        model = _converted(_tiny(), path).train(train)
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the autocast rules trace too
        explained = torch._dynamo.explain(_converted(_tiny(), path))(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    # train: forward + backward through AOTAutograd (aot_eager: Inductor's code generation costs minutes here)
    eager_model, compiled_model = _converted(_tiny(), path).train(), _converted(_tiny(), path).train()
    y, grads = _fwd_bwd(eager_model, x)
    y_c, grads_c = _fwd_bwd(compiled_model, x, torch.compile(compiled_model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(y_c, y)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], msg=lambda m, name=name: f"grad {name}: {m}")
    for (name, b), b_c in zip(eager_model.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b_c, b, msg=lambda m, name=name: f"buffer {name}: {m}")


def test_compile_inductor_eval_matches_eager():
    """Inductor's C++ code generation is slow on 2 cores: a small model of the two timm layers only."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), CbamModule(32, rd_ratio=1 / 4), NonLocalAttn(32))
    with torch.no_grad():
        model[2].norm.weight.normal_(0, 0.5)
    model = fastattn.convert(model).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


@pytest.mark.parametrize("path", PATHS)
def test_export(path):
    model = _converted(_tiny(), path).eval()
    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))
        x2 = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(exported.module()(x2), model(x2))


@pytest.mark.parametrize("model_name", ["tiny", "resnet18-cbam"])
def test_autocast_bfloat16_parity(model_name):
    original = (_tiny() if model_name == "tiny" else _timm_model(model_name)).eval()
    truth = copy.deepcopy(original).double()
    converted = fastattn.convert(original)
    x = torch.randn(2, 3, 16, 16) if model_name == "tiny" else _batch()[0]
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_eager, y_fused = original(x), converted(x)
        y_truth = truth(x.double())
    assert y_fused.dtype == y_eager.dtype
    assert_error_rule("logits", y_fused.float(), y_truth, y_eager.float(), atol=ATOL[torch.bfloat16])


# --------------------------------------------------------------------------
# DistributedDataParallel, gloo, 2 processes on this machine
# --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_step_one_state_gradients_match_in_one_process():
    """The DDP worker's comparison, in one process, at the state of rank 1's step 1: the
    weights after one SGD step on both ranks' step-0 gradients averaged as DDP averages
    them (each halved, then summed: bit for bit), and rank 1's batch. There, in float32
    on an AVX2 machine, an input of layer2.1.act1 fell within rounding of zero and took
    different sides of the ReLU in the original and the converted copy (see
    _ddp_worker's docstring)."""
    import _ddp_worker as worker
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker: the state is bit for bit rank 1's
    try:
        original = worker.model()
        steps = [worker.batches(rank) for rank in range(2)]
        step0_grads = []
        for x, target in (steps[0][0], steps[1][0]):
            original.zero_grad()
            F.cross_entropy(original(x), target).backward()
            step0_grads.append([p.grad.clone() for p in original.parameters()])
        for p, g0, g1 in zip(original.parameters(), *step0_grads):
            p.grad = g0 / 2 + g1 / 2
        torch.optim.SGD(original.parameters(), lr=worker.LR).step()
        x, target = steps[1][1]
        for label, model in {"original": original, **{p: _converted(original, p) for p in _model_paths()}}.items():
            model.zero_grad()
            F.cross_entropy(model(x), target).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            if label == "original":
                grads_original = grads
            else:
                worker.assert_gradients_match(grads, grads_original, f"{label} at rank 1's step 1")
    finally:
        torch.set_num_threads(threads)


def test_ddp_gloo_gradients_match_original(tmp_path):
    import _ddp_worker
    world_size, timeout_s = 2, 240
    ctx = mp.start_processes(_ddp_worker.run, args=(world_size, _free_port(), str(tmp_path), _model_paths()),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {timeout_s} s")
    finally:
        for process in ctx.processes:  # only the workers this test started
            if process.is_alive():
                process.kill()
                process.join()
    for rank in range(world_size):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [r["step"] for r in report] == list(range(_ddp_worker.STEPS))
