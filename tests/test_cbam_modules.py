"""fastattn.nn.CBAM against the layers it replaces: timm's CbamModule and
LightCbamModule, and the official implementation (fastattn.reference.OfficialCBAM,
a verbatim twin). Outputs, input and parameter gradients, and BatchNorm running
statistics, in train and eval mode, per backend, docs/DESIGN.md §4 error rule."""
import copy

import pytest
import torch
from timm.layers.cbam import CbamModule, LightCbamModule

import fastattn
from fastattn import reference
from _util import ATOL, GRAD_ATOL, OpLog, assert_error_rule, compiled_backends, interpreted, \
    module_forward_backward, run_module

torch.manual_seed(0)


def _original(flavor: str, channels: int, reduction: int) -> torch.nn.Module:
    if flavor == "timm":
        return CbamModule(channels, rd_ratio=1.0 / reduction)
    if flavor == "timm_light":
        return LightCbamModule(channels, rd_ratio=1.0 / reduction)
    return reference.OfficialCBAM(channels, reduction)


def _randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.normal_()
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)


def _inputs(shape, ties: bool, channels_last: bool) -> torch.Tensor:
    x = torch.randn(shape)
    if ties:  # ReLU'd and rounded: many exact ties in every max
        x = x.relu().round(decimals=1)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _fused_paths():
    """(label, runner) for every fused path available here; the op contract in PyTorch always is."""
    paths = [("contract-ops", "reference")]
    for name in compiled_backends("cpu"):
        paths.append((name, name))
    return paths


def _fused_like(original, backend, *args, **kwargs):
    """fastattn.nn.CBAM(*args, **kwargs) holding original's weights, on one of _fused_paths()'s backends.
    "reference" here is the fused path on the op contract written in PyTorch (the module's own
    backend="reference" would run the original's forward instead)."""
    fused = fastattn.nn.CBAM(*args, **kwargs, backend="auto" if backend == "reference" else backend)
    loaded = fused.load_state_dict(original.state_dict())
    assert not loaded.missing_keys and not loaded.unexpected_keys
    if backend == "reference":
        fused.forward = lambda inp: fastattn.nn.CBAM._fused(fused, inp, "reference")
    return fused


def _check_parity(flavor, train, backend, shape, ties, channels_last, reduction=4):
    channels = shape[1]
    original = _original(flavor, channels, reduction)
    _randomize(original)
    original.train(train)
    truth_module = copy.deepcopy(original).double()
    fused = _fused_like(original, backend, channels, reduction, flavor=flavor).train(train)

    x = _inputs(shape, ties, channels_last)
    grad_y = torch.randn(shape)
    y_eager, g_eager = module_forward_backward(original, x, grad_y)
    y_truth, g_truth = module_forward_backward(truth_module, x.double(), grad_y.double())
    y_fused, g_fused = module_forward_backward(fused, x, grad_y)

    assert_error_rule("y", y_fused, y_truth, y_eager)
    if channels_last:
        assert y_fused.is_contiguous(memory_format=torch.channels_last)
    assert g_fused.keys() == g_truth.keys()
    for name in g_truth:
        assert_error_rule(f"grad {name}", g_fused[name], g_truth[name], g_eager[name])
    for (name, b_fused), b_truth, b_eager in zip(fused.named_buffers(), truth_module.buffers(), original.buffers()):
        if b_fused.is_floating_point():
            assert_error_rule(f"buffer {name}", b_fused, b_truth, b_eager)
        else:
            assert torch.equal(b_fused, b_eager), f"buffer {name}: {b_fused} != {b_eager}"


@pytest.mark.parametrize("flavor", ["timm", "timm_light", "official"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("label,backend", _fused_paths())
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_cbam_matches_original(flavor, train, label, backend, ties):
    shape = (2, 8, 5, 7) if backend == "triton" and interpreted() else (3, 32, 9, 11)
    _check_parity(flavor, train, backend, shape, ties, channels_last=False)


@pytest.mark.parametrize("label,backend", [p for p in _fused_paths() if p[1] != "triton"])
@pytest.mark.parametrize("shape", [(2, 1, 1, 1), (1, 3, 7, 7), (8, 17, 13, 17), (8, 64, 1, 1)])
# (train-mode BN over N*H*W = 2 values has an exactly-zero conv gradient: any float result is rounding noise)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cbam_awkward_shapes(label, backend, shape, channels_last):
    _check_parity("timm", True, backend, shape, ties=True, channels_last=channels_last, reduction=16)
    _check_parity("official", True, backend, shape, ties=True, channels_last=channels_last, reduction=1)


@pytest.mark.parametrize("flavor", ["timm", "timm_light", "official"])
@pytest.mark.parametrize("label,backend", _fused_paths())
def test_train_mode_refuses_one_value_per_channel_as_batchnorm_does(flavor, label, backend):
    """Train-mode BatchNorm over N*H*W = 1 value: nn.BatchNorm2d raises; so must the fused module,
    before it touches the running statistics (it used to return a number and update them)."""
    original = _original(flavor, 8, 4).train()
    fused = _fused_like(original, backend, 8, 4, flavor=flavor).train()
    before = copy.deepcopy(fused.state_dict())
    x = torch.randn(1, 8, 1, 1)
    with pytest.raises(ValueError) as theirs:
        original(x)
    with pytest.raises(ValueError) as ours:
        fused(x)
    assert str(ours.value) == str(theirs.value)
    for name, value in fused.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert fused.eval()(x).shape == x.shape  # running statistics: one value is fine


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("label,backend", _fused_paths())
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
def test_official_mlp_without_hidden_units(label, backend, mode):
    """The official MLP has C // reduction hidden units: none when reduction > C, and it then adds
    its output bias alone. The cpu inference op used to refuse the empty weight."""
    original = reference.OfficialCBAM(3, 16)
    assert original.ChannelGate.mlp[1].out_features == 0
    _randomize(original)
    fused = _fused_like(original, backend, 3, 16, flavor="official")
    original.train(mode == "train")
    fused.train(mode == "train")
    x = torch.randn(2, 3, 5, 6)
    with torch.set_grad_enabled(mode != "eval-no-grad"):
        assert_error_rule("y", fused(x), copy.deepcopy(original).double()(x.double()), original(x))


# ---------------------------------------------------------------------------
# Under torch.autocast (mixed-precision training): fused, in the dtypes the original gives there
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
@pytest.mark.parametrize("flavor", ["timm", "timm_light", "official"])
@pytest.mark.parametrize("label,backend", _fused_paths())
def test_autocast_stays_fused_and_matches_original(label, backend, flavor, mode, dtype):
    """x in the autocast dtype (the output of an autocast conv): the block runs fastattn's ops, not its
    original forward, and gives the original's dtypes (y and dx in x's dtype, float32 parameter
    gradients and running statistics) and its numbers under the error rule of that dtype."""
    if backend == "triton" and dtype == torch.bfloat16 and interpreted():
        pytest.skip("the Triton interpreter lacks bfloat16 math")
    original = _original(flavor, 32, 4)
    _randomize(original)
    # the op-contract path replaces _fused, not forward: the autocast dispatch in forward is under test
    fused = _fused_like(original, "auto" if backend == "reference" else backend, 32, 4, flavor=flavor)
    ran_fused = []
    if backend == "reference":  # the fused path on the op contract written in PyTorch (no fastattn ops)
        fused._fused = lambda inp, _backend, parts, **kw: ran_fused.append(1) or fastattn.nn.CBAM._fused(
            fused, inp, "reference", parts, **kw)
    shape = (2, 32, 5, 7) if backend == "triton" and interpreted() else (3, 32, 9, 11)
    x, grad_y = torch.randn(shape).to(dtype), torch.randn(shape)
    truth = run_module(copy.deepcopy(original).double(), x.double(), grad_y.double(), mode)
    eager = run_module(copy.deepcopy(original), x, grad_y, mode, autocast_dtype=dtype)
    with OpLog() as log:
        got = run_module(fused, x, grad_y, mode, autocast_dtype=dtype)
    assert log.ops or ran_fused, "the fused block ran its original forward under autocast"
    assert got[0].dtype == eager[0].dtype == dtype
    assert_error_rule("y", got[0], truth[0], eager[0], atol=ATOL[dtype])
    assert got[1].keys() == eager[1].keys()
    for part, atol in ((1, GRAD_ATOL[dtype]), (2, ATOL[dtype])):
        for name in eager[part]:
            assert got[part][name].dtype == eager[part][name].dtype, name
            assert_error_rule(name, got[part][name], truth[part][name], eager[part][name],
                              atol=ATOL[dtype] if name == "x" else atol)


def test_official_checkpoint_keys_load_as_they_are():
    official = reference.OfficialCBAM(64)
    fused = fastattn.nn.CBAM(64, flavor="official")
    assert list(fused.state_dict()) == list(official.state_dict())
    assert "ChannelGate.mlp.1.weight" in fused.state_dict()
    assert "SpatialGate.spatial.bn.running_var" in fused.state_dict()
    fused.load_state_dict(official.state_dict())


@pytest.mark.parametrize("flavor,cls", [("timm", CbamModule), ("timm_light", LightCbamModule)])
def test_timm_keys_equal(flavor, cls):
    assert list(fastattn.nn.CBAM(64, flavor=flavor).state_dict()) == list(cls(64).state_dict())


def test_official_no_spatial():
    original = reference.OfficialCBAM(16, 4, no_spatial=True)
    fused = fastattn.nn.CBAM(16, 4, flavor="official", no_spatial=True)
    fused.load_state_dict(original.state_dict())
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(fused(x), original(x))


def test_bad_flavor_and_backend_are_named():
    with pytest.raises(ValueError, match="flavor"):
        fastattn.nn.CBAM(8, flavor="nope")
    with pytest.raises(ValueError, match="backend"):
        fastattn.nn.CBAM(8, backend="nope")
    with pytest.raises(ValueError, match="no_spatial"):
        fastattn.nn.CBAM(8, flavor="timm", no_spatial=True)


@pytest.mark.parametrize("flavor", ["timm", "timm_light", "official"])
def test_gate_modules_match_reference(flavor):
    gate = fastattn.nn.ChannelGate(16, 4, flavor=flavor)
    _randomize(gate)
    x = torch.randn(2, 16, 6, 5).relu().round(decimals=1).requires_grad_()
    avg, mx = x.mean((2, 3)), (x.amax((2, 3)) if flavor != "official" else x.flatten(2).max(2)[0])
    pre = gate._mlp(0.5 * avg + 0.5 * mx) if flavor == "timm_light" else gate._mlp(avg) + gate._mlp(mx)
    expect = x * torch.sigmoid(pre)[:, :, None, None]
    torch.testing.assert_close(gate(x), expect)

    sgate = fastattn.nn.SpatialGate(7, flavor=flavor)
    _randomize(sgate)
    twin = (reference.OfficialSpatialGate(7) if flavor == "official"
            else reference.TimmSpatialAttn(7, light=flavor == "timm_light"))
    twin.load_state_dict(sgate.state_dict())
    torch.testing.assert_close(sgate(x), twin(x))


# ---------------------------------------------------------------------------
# Inference on the cpu backend: one op, cbam_forward_eval (fastattn/_fused_cbam.py inference_forward)
# ---------------------------------------------------------------------------
# odd batches and one-row or one-column maps, a map wider than a lane tile (512), channel counts that
# leave vector tails, a batch below the thread count (images split in row chunks)
INFERENCE_SHAPES = [(3, 32, 9, 11), (1, 17, 56, 56), (2, 3, 1, 7), (2, 5, 13, 1), (1, 4, 3, 600), (4, 256, 7, 7),
                    (1, 8, 100, 3)]


@pytest.mark.skipif("cpu" not in compiled_backends("cpu"), reason="needs the compiled cpu backend")
@pytest.mark.parametrize("flavor", ["timm", "timm_light", "official", "official-no-spatial"])
@pytest.mark.parametrize("shape", INFERENCE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_cpu_inference_is_one_op(flavor, shape, channels_last, dtype):
    """eval + no_grad on the cpu backend runs cbam_forward_eval alone; its output meets the error rule
    against the float64 original and matches the autograd path's."""
    no_spatial = flavor == "official-no-spatial"
    flavor = flavor.removesuffix("-no-spatial")
    channels = shape[1]
    if no_spatial:
        original = reference.OfficialCBAM(channels, 1, no_spatial=True)
    else:
        original = _original(flavor, channels, 1 if channels < 4 else 4)
    _randomize(original)
    original.eval()
    fused = fastattn.nn.CBAM(channels, 1 if channels < 4 or no_spatial else 4, flavor=flavor,
                             no_spatial=no_spatial, backend="cpu").eval()
    fused.load_state_dict(original.state_dict())
    fused.to(dtype)
    x = _inputs(shape, ties=False, channels_last=channels_last).to(dtype)
    with torch.no_grad():
        with OpLog() as log:
            y = fused(x)
        truth = copy.deepcopy(original).double()(x.double())
        eager = copy.deepcopy(original).to(dtype)(x)
    assert log.ops == ["cbam_forward_eval"]
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last if channels_last
                                                else torch.contiguous_format)
    assert_error_rule("y", y, truth, eager)
    y_autograd = fused(x)  # the parameters require grad: the training path's kernels
    assert y_autograd.requires_grad
    assert_error_rule("y vs autograd path", y, truth, y_autograd.detach())


@pytest.mark.skipif("cpu" not in compiled_backends("cpu"), reason="needs the compiled cpu backend")
@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("flavor", ["timm", "official"])
def test_cpu_inference_other_spatial_kernels(flavor, kernel):
    original = (CbamModule(24, rd_ratio=0.25, spatial_kernel_size=kernel) if flavor == "timm"
                else reference.OfficialCBAM(24, 4, kernel_size=kernel))
    _randomize(original)
    original.eval()
    fused = fastattn.nn.CBAM(24, 4, flavor=flavor, spatial_kernel=kernel, backend="cpu").eval()
    fused.load_state_dict(original.state_dict())
    x = torch.randn(3, 24, 10, 13)
    with torch.no_grad(), OpLog() as log:
        y = fused(x)
    assert log.ops == ["cbam_forward_eval"]
    with torch.no_grad():
        assert_error_rule("y", y, copy.deepcopy(original).double()(x.double()), original(x))


@pytest.mark.skipif("cpu" not in compiled_backends("cpu"), reason="needs the compiled cpu backend")
def test_cpu_inference_path_is_taken_only_without_grad_and_running_stats():
    fused = fastattn.nn.CBAM(16, 4, backend="cpu")
    x = torch.randn(2, 16, 6, 6)
    # (label, train mode, parameters require grad, grad mode, x requires grad, takes cbam_forward_eval)
    cases = [("train, no_grad: BN on batch statistics", True, True, False, False, False),
             ("eval, parameters require grad", False, True, True, False, False),
             ("eval, x requires grad", False, False, True, True, False),
             ("eval, no_grad", False, True, False, True, True),
             ("eval, nothing requires grad", False, False, True, False, True)]
    for label, train, params_grad, grad_mode, x_grad, takes_eval_op in cases:
        fused.train(train).requires_grad_(params_grad)
        with torch.set_grad_enabled(grad_mode), OpLog() as log:
            y = fused(x.clone().requires_grad_(x_grad))
        assert ("cbam_forward_eval" in log.ops) == takes_eval_op, (label, log.ops)
        assert y.requires_grad == (grad_mode and (params_grad or x_grad)), label


@pytest.mark.skipif("cpu" not in compiled_backends("cpu"), reason="needs the compiled cpu backend")
def test_cpu_inference_compiles_fullgraph():
    fused = fastattn.nn.CBAM(32, 4, backend="cpu").eval()
    _randomize(fused)
    x = torch.randn(2, 32, 9, 9)
    with torch.no_grad():
        expect = fused(x)
        got = torch.compile(fused, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
