"""In-place CBAM inference: the op cbam_forward_eval_, nn.CBAM(inplace=True) and convert(cbam_inplace=True).

The in-place op must give the out-of-place op's bits exactly: the band walk of pass 2 must never read a
row of x it already wrote, also where an image is split into row chunks whose conv reach crosses into
a neighbour (small batches on several threads)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastattn
from fastattn import reference
from _util import OpLog, compiled_backends

pytestmark = pytest.mark.skipif("cpu" not in compiled_backends("cpu"), reason="needs the compiled cpu backend")

ops = torch.ops.fastattn


def _op_args(c: int, dtype, kernel: int = 7, light: bool = False, max_first: bool = False, spatial: bool = True,
             biases: bool = False, seed: int = 0):
    """cbam_forward_eval's arguments after x, random (running statistics included)."""
    g = torch.Generator().manual_seed(seed)
    hidden = max(1, c // 4)
    rnd = lambda *s: (0.5 * torch.randn(*s, generator=g)).to(dtype)  # noqa: E731
    w1, w2 = rnd(hidden, c), rnd(c, hidden)
    b1, b2 = (rnd(hidden), rnd(c)) if biases else (None, None)
    if not spatial:
        return [w1, b1, w2, b2, None, None, None, None, None, 1e-5, [0, 0], light, max_first]
    conv_w = rnd(1, 1 if light else 2, kernel, kernel)
    bn_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # BatchNorm keeps float32 for 16-bit x
    bn = [t.to(bn_dtype) for t in (torch.randn(1, generator=g), torch.randn(1, generator=g),
                                   torch.randn(1, generator=g), torch.rand(1, generator=g) + 0.5)]
    return [w1, b1, w2, b2, conv_w, *bn, 1e-5, [kernel // 2] * 2, light, max_first]


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    same = a.contiguous().view(bits) == b.contiguous().view(bits)
    assert same.all(), f"{(~same).sum().item()} of {a.numel()} elements differ, max |diff| {(a - b).abs().max()}"


# odd sizes, one-row and one-column maps, a map wider than a lane tile, and small batches whose images
# split into row chunks (a chunk shorter than the conv's reach too: 1 x 8 x 60 x 600 on 8 threads)
SHAPES = [(1, 32, 56, 56), (2, 16, 57, 31), (3, 5, 13, 1), (1, 8, 1, 9), (1, 8, 60, 600), (4, 64, 7, 7)]


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kernel", [1, 3, 7])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_inplace_op_gives_the_out_of_place_bits(threads, shape, kernel, layout, dtype):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = _op_args(shape[1], dtype, kernel, light=kernel == 3, max_first=kernel == 7)
        x = torch.randn(shape).to(dtype)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        y = ops.cbam_forward_eval(x, *args)
        ptr, strides, version = x.data_ptr(), x.stride(), x._version
        assert ops.cbam_forward_eval_(x, *args) is None
        assert x.data_ptr() == ptr and x.stride() == strides
        assert x._version > version  # autograd sees the write
        _assert_same_bits(x, y)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_per_image_walk_gives_the_same_bits_on_any_thread_count(dtype):
    """Where the MLP is small beside an image (here 2 * 4 * 16 weights, 90 positions of 16 channels)
    the MLP runs per image; with at least two images per thread (5 images on 1 and 2 threads) each
    task also pools its image's channels right before its band walk. Every thread count, pipelined
    or not, in place or not, must give the same bits, and float64 the oracle's values."""
    args = _op_args(16, dtype, biases=True)
    x = torch.randn(5, 16, 9, 10).to(dtype)
    old = torch.get_num_threads()
    try:
        outs = {}
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            outs[threads] = ops.cbam_forward_eval(x, *args)
            w = x.clone()
            ops.cbam_forward_eval_(w, *args)
            _assert_same_bits(w, outs[threads])
    finally:
        torch.set_num_threads(old)
    for threads in (2, 3, 8):
        _assert_same_bits(outs[threads], outs[1])
    if dtype == torch.float64:
        torch.testing.assert_close(outs[1], reference.ref_cbam_forward_eval(x, *args))


@pytest.mark.parametrize("variant", ["no-spatial", "biases", "nan"])
def test_inplace_op_other_variants(variant):
    old = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        args = _op_args(24, torch.float32, spatial=variant != "no-spatial", biases=variant == "biases")
        x = torch.randn(2, 24, 30, 17)
        if variant == "nan":
            x[0, 3, 11, 5] = float("nan")
            x[1, :, 20, 2] = float("inf")
        y = ops.cbam_forward_eval(x, *args)
        ops.cbam_forward_eval_(x, *args)
        _assert_same_bits(x, y)
    finally:
        torch.set_num_threads(old)


def test_inplace_op_matches_the_oracle_and_opcheck():
    args = _op_args(16, torch.float64)
    x = torch.randn(2, 16, 9, 10, dtype=torch.float64)
    want = reference.ref_cbam_forward_eval(x, *args)
    ops.cbam_forward_eval_(x, *args)
    torch.testing.assert_close(x, want)
    torch.library.opcheck(ops.cbam_forward_eval_, (torch.randn(2, 16, 9, 10), *_op_args(16, torch.float32)))


def test_inplace_op_errors():
    args = _op_args(16, torch.float32)
    with pytest.raises(RuntimeError, match="must be contiguous or channels_last"):
        ops.cbam_forward_eval_(torch.randn(2, 16, 9, 20)[..., ::2], *args)
    with pytest.raises(RuntimeError, match="must be contiguous or channels_last"):
        ops.cbam_forward_eval_(torch.randn(1, 16, 9, 10).expand(3, 16, 9, 10), *args)
    with pytest.raises(RuntimeError, match="got x requiring grad"):
        ops.cbam_forward_eval_(torch.randn(2, 16, 9, 10, requires_grad=True), *args)
    w1 = args[0].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="got w1 requiring grad"):
        ops.cbam_forward_eval_(torch.randn(2, 16, 9, 10), w1, *args[1:])
    with torch.no_grad():  # no gradient wanted: the write is allowed, as for any in-place op
        ops.cbam_forward_eval_(torch.randn(2, 16, 9, 10, requires_grad=True), w1, *args[1:])


def test_inplace_write_is_seen_by_autograd():
    """x saved by an earlier op and then overwritten under no_grad: backward refuses, as for relu_."""
    a = torch.randn(2, 16, 9, 10, requires_grad=True)
    x = a * 2
    z = (x * x).sum()  # saves x
    with torch.no_grad():
        ops.cbam_forward_eval_(x, *_op_args(16, torch.float32))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


# ---------------------------------------------------------------------------
# nn.CBAM(inplace=True)
# ---------------------------------------------------------------------------
def _pair(flavor="timm", channels=32, **kwargs):
    """(out-of-place, in-place) fused CBAM with the same random parameters and running statistics."""
    plain = fastattn.nn.CBAM(channels, 4, flavor=flavor, backend="cpu", **kwargs)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.5)
        for name, b in plain.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                b.normal_()
    inplace = copy.deepcopy(plain)
    inplace.inplace = True
    return plain.eval(), inplace.eval()


@pytest.mark.parametrize("flavor", ["timm", "timm_light", "official"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_module_writes_y_over_x(flavor, layout, mode):
    plain, inplace = _pair(flavor)
    x = torch.randn(3, 32, 14, 15)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    if mode == "nothing_requires_grad":
        plain.requires_grad_(False)
        inplace.requires_grad_(False)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "nothing_requires_grad": torch.enable_grad}[mode]
    with ctx():
        if mode == "inference_mode":
            x = x.clone(memory_format=torch.preserve_format)  # an inference tensor, written inside the mode
        want = plain(x)
        ptr = x.data_ptr()
        with OpLog() as log:
            y = inplace(x)
    assert y is x and x.data_ptr() == ptr
    assert log.ops == ["cbam_forward_eval_"]
    _assert_same_bits(x, want)
    assert "inplace=True" in repr(inplace)


def test_module_under_autocast_in_x_dtype_runs_in_place():
    """bfloat16 x under a bfloat16 autocast (float32 parameters): the fused path, in place."""
    plain, inplace = _pair()
    x = torch.randn(2, 32, 9, 8).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain(x)
        with OpLog() as log:
            y = inplace(x)
    assert y is x and log.ops == ["cbam_forward_eval_"]
    _assert_same_bits(x, want)


@pytest.mark.parametrize("case", ["strided view", "train-mode BatchNorm", "autocast", "reference backend"])
def test_module_without_an_inplace_kernel_still_writes_over_x(case):
    """Where the in-place op cannot run, y is computed out of place and copied into x."""
    plain, inplace = _pair()
    big = torch.randn(2, 32, 10, 24)
    x = big[..., 3:17]  # a view: not contiguous, but every element its own
    if case == "train-mode BatchNorm":
        plain.train()
        inplace.train()
    if case == "reference backend":
        plain.backend = inplace.backend = "reference"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        want = plain(x)  # float32 x under a bfloat16 autocast: the original forward
        with OpLog() as log:
            y = inplace(x)
    assert y is x
    assert "cbam_forward_eval_" not in log.ops
    _assert_same_bits(x, want.to(x.dtype))
    if case == "strided view":
        torch.testing.assert_close(big[..., 3:17], want, rtol=0, atol=0)  # written through the view
    if case == "train-mode BatchNorm":
        for (name, a), b in zip(plain.named_buffers(), inplace.buffers()):
            assert torch.equal(a, b), name  # the running statistics were updated the same way


def test_module_errors():
    _, inplace = _pair()
    x = torch.randn(2, 32, 8, 8)
    with pytest.raises(RuntimeError, match=r"inplace=True\) writes its output over x \(shape \(2, 32, 8, 8\)\).*"
                                           r"parameter 'channel.fc1.weight'"):
        inplace(x)  # grad mode on and the parameters require grad
    inplace.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"gradient is wanted \(x requires grad\)"):
        inplace(x.clone().requires_grad_())
    with torch.no_grad(), pytest.raises(ValueError, match=r"strides \(0, 64, 8, 1\).*share one memory location"):
        inplace(torch.randn(1, 32, 8, 8).expand(2, 32, 8, 8))
    with torch.inference_mode():
        frozen = torch.randn(2, 32, 8, 8)
    with pytest.raises(RuntimeError, match="inference tensor"):
        inplace(frozen)
    inplace.inplace = False  # the same module trains
    inplace.requires_grad_(True).train()
    inplace(x.clone().requires_grad_()).sum().backward()


def test_module_compiles_fullgraph():
    plain, inplace = _pair()
    x = torch.randn(2, 32, 12, 12)
    with torch.no_grad():
        want = plain(x)
        compiled = torch.compile(inplace, fullgraph=True)
        y = compiled(x)
    assert y is x or torch.equal(y, x)  # the graph's input mutation is applied to x
    _assert_same_bits(x, want)


# ---------------------------------------------------------------------------
# convert(model, cbam_inplace=True)
# ---------------------------------------------------------------------------
class _Net(nn.Module):
    """Three CBAM blocks: after an in-place ReLU (safe), before a residual add that reads the block's
    input again (unsafe), and on the model's own input (unsafe)."""

    def __init__(self):
        super().__init__()
        self.cbam_in = reference.OfficialCBAM(16, 4)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.act = nn.ReLU(inplace=True)
        self.cbam_safe = reference.OfficialCBAM(16, 4)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.cbam_residual = reference.OfficialCBAM(16, 4)

    def forward(self, x):
        x = self.cbam_in(x)
        h = self.cbam_safe(self.act(self.bn1(self.conv1(x))))
        h = self.conv2(h)
        return h + self.cbam_residual(h)


def test_convert_sets_inplace_only_where_proven():
    model = _Net().eval()
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        want = model(x.clone())
    fused, report = fastattn.convert(model, backend="cpu", return_report=True, cbam_inplace=True)
    assert report.inplace == ["cbam_safe"]
    reasons = dict(report.not_inplace)
    assert "the model's input" in reasons["cbam_in"]
    assert "also used by" in reasons["cbam_residual"]
    assert [fused.cbam_in.inplace, fused.cbam_safe.inplace, fused.cbam_residual.inplace] == [False, True, False]
    x_before = x.clone()
    with torch.no_grad(), OpLog() as log:
        y = fused(x)
    assert log.ops.count("cbam_forward_eval_") == 1
    assert torch.equal(x, x_before)  # the caller's input is untouched
    torch.testing.assert_close(y, want)
    assert "in place: 1 CBAM block(s): cbam_safe" in str(report)


def test_convert_without_the_option_leaves_blocks_out_of_place():
    fused, report = fastattn.convert(_Net().eval(), backend="cpu", return_report=True)
    assert report.inplace == [] and report.not_inplace == []
    assert not any(m.inplace for m in fused.modules() if isinstance(m, fastattn.nn.CBAM))


def test_convert_refuses_a_model_that_does_not_trace():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)
            self.cbam = reference.OfficialCBAM(8, 2)

        def forward(self, x):
            h = self.conv(x)
            if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                h = h * 2
            return self.cbam(h)

    _, report = fastattn.convert(Branchy().eval(), backend="cpu", return_report=True, cbam_inplace=True)
    assert report.inplace == []
    assert "does not trace with torch.fx" in dict(report.not_inplace)["cbam"]


# ---------------------------------------------------------------------------
# The bench's provider (bench/providers.py: fastattn-cpu-inplace)
# ---------------------------------------------------------------------------
def test_bench_inplace_provider_refills_its_input():
    from bench import cases, providers
    from bench.timing import Clock, round_robin

    fwd, train = cases._cbam("tiny", (2, 32, 8, 8), "float32")
    inputs = providers.make_inputs(fwd, torch.device("cpu"))
    want = providers.prepare("fastattn-cpu", fwd, inputs).run()
    prep = providers.prepare(providers.INPLACE, fwd, inputs)
    for _ in range(2):  # refilled before each call: the same input, the same output
        prep.refill()
        _assert_same_bits(prep.run(), want)
    calls = []
    times, errors = round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2,
                                Clock(torch.device("cpu")), before={"a": lambda: calls.append("refill a")})
    assert not errors and calls.count("refill a") == 2 and calls.count("b") == 2
    assert [c for c in calls if c.endswith("a")] == ["refill a", "a"] * 2
    with pytest.raises(ValueError, match="inference only"):
        providers.prepare(providers.INPLACE, train, providers.make_inputs(train, torch.device("cpu")))
