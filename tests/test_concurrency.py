"""Concurrency, fork and run-to-run determinism (issue 19), on the cpu and reference backends:

* threads: N Python threads calling every op and module at once get the single-thread results bit for bit;
* fork: a child forked from a parent that has used its intra-op thread pool (as DataLoader workers
  are) runs every op and module after torch.set_num_threads(1), as PyTorch requires there, and gets
  the parent's results bit for bit;
* the same input gives bitwise-equal results across repeated calls, and across two processes at a
  fixed thread count.

One workload holds every public op (forward and the gradients of its inputs) and every module
(forward, and the gradients of x and of its parameters, taken with autograd.grad so that threads
sharing a module write nothing to it; and the no-grad forward, the cpu backend's one-op inference).
"""
import io
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

import fastattn
from _util import assert_equal_values, compiled_backends, randomize, run_in_threads

BACKENDS = ["reference"] + [b for b in ("cpu",) if b in compiled_backends("cpu")]
THREADS = 4


def _inputs():
    g = torch.Generator().manual_seed(19)
    x = torch.randn(2, 16, 7, 9, generator=g).relu()  # ties in the max pools
    return dict(
        x=x, x_cl=x.contiguous(memory_format=torch.channels_last), x_bf16=x.bfloat16(),
        ch=torch.rand(2, 16, generator=g), sp=torch.rand(2, 7, 9, generator=g),
        qkv=[torch.randn(2, 8, 5, 7, generator=g) for _ in range(3)],
        qkv_3d=[torch.randn(2, 24, 8, generator=g).transpose(1, 2).contiguous().transpose(1, 2) for _ in range(3)],
        cot=torch.randn(2, 16, 7, 9, generator=g))


def _modules(backend):
    fnn = fastattn.nn
    built = {f"CBAM {flavor}": fnn.CBAM(16, 4, flavor=flavor, backend=backend) for flavor in fnn.FLAVORS}
    built.update({"ChannelGate": fnn.ChannelGate(16, 4, backend=backend), "SpatialGate": fnn.SpatialGate(backend=backend),
                  "NonLocal2d": fnn.NonLocal2d(16, sub_sample=True, backend=backend),
                  "SelfAttention2d": fnn.SelfAttention2d(16, backend=backend),
                  "AttentionBlock2d": fnn.AttentionBlock2d(16, 2, groups=4, backend=backend),
                  "NonLocalAttn": fnn.NonLocalAttn(16, backend=backend)})
    for seed, module in enumerate(built.values()):
        randomize(module, seed)
        module.eval()
    return built


def _with_grads(name, fn, inputs, results):
    """results[name ...] = fn(*inputs) and the gradients of every input for a fixed cotangent."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    cots = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape) for o in outs]
    grads = torch.autograd.grad(outs, inputs, cots, allow_unused=True)
    for i, t in enumerate(outs):
        results[f"{name} out{i}"] = t.detach()
    for i, t in enumerate(grads):
        if t is not None:
            results[f"{name} grad{i}"] = t


def workload(backend, data, modules):
    """Every op and module on fixed inputs -> {name: tensor}."""
    r = {}
    kw = dict(backend=backend)
    for key in ("x", "x_cl", "x_bf16"):
        x, ch, sp = data[key], data["ch"].to(data[key].dtype), data["sp"].to(data[key].dtype)
        for ties in ("split", "first"):
            _with_grads(f"channel_pool {key} {ties}", lambda a: fastattn.channel_pool(a, ties=ties, **kw), [x], r)
            _with_grads(f"gated_spatial_pool {key} {ties}",
                        lambda a, b: fastattn.gated_spatial_pool(a, b, ties=ties, **kw), [x, ch], r)
        _with_grads(f"cbam_apply {key}", lambda a, b, c: fastattn.cbam_apply(a, b, c, **kw), [x, ch, sp], r)
    for key in ("qkv", "qkv_3d"):
        _with_grads(f"spatial_attention {key}", lambda q, k, v: fastattn.spatial_attention(q, k, v, heads=2, **kw),
                    data[key], r)
    x = data["x"]
    for name, module in modules.items():
        params = list(module.parameters())
        xg = x.detach().requires_grad_()
        y = module(xg)
        grads = torch.autograd.grad(y, [xg] + params, data["cot"], allow_unused=True)
        r[f"{name} y"] = y.detach()
        r.update({f"{name} grad{i}": g for i, g in enumerate(grads) if g is not None})
        with torch.no_grad():
            r[f"{name} y no-grad"] = module(x)
    return r


def assert_bitwise_equal(got, want, what):
    assert got.keys() == want.keys(), f"{what}: results {sorted(set(got) ^ set(want))} missing on one side"
    for name in want:
        assert_equal_values(f"{what}: {name}", got[name], want[name])


def _serialized(results) -> bytes:
    buf = io.BytesIO()
    torch.save(results, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup():
    return {backend: (_inputs(), _modules(backend)) for backend in BACKENDS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_calls_are_bitwise_equal(setup, backend):
    data, modules = setup[backend]
    assert_bitwise_equal(workload(backend, data, modules), workload(backend, data, modules), "a repeated call")


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_at_once_get_single_thread_results(setup, backend):
    data, modules = setup[backend]
    expected = workload(backend, data, modules)
    got = run_in_threads(lambda _: [workload(backend, data, modules) for _ in range(2)], range(THREADS))
    for i, runs in enumerate(got):
        for j, results in enumerate(runs):
            assert_bitwise_equal(results, expected, f"thread {i}, call {j}")


def _child(backend, data, modules, conn):
    try:
        torch.set_num_threads(1)  # what PyTorch requires of a forked child that uses intra-op threads
        conn.send_bytes(_serialized(workload(backend, data, modules)))
    except BaseException as exc:  # noqa: BLE001  (reported by the parent)
        conn.send_bytes(repr(exc).encode())
    finally:
        conn.close()
        os._exit(0)  # no atexit handlers, no pytest teardown in the child


@pytest.mark.skipif(sys.platform != "linux", reason="the fork start method (DataLoader workers' default) is Linux's")
@pytest.mark.parametrize("backend", BACKENDS)
def test_forked_child_gets_parent_results(setup, backend):
    data, modules = setup[backend]
    workload(backend, data, modules)  # the parent's intra-op pool has run before the fork
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # bitwise equality holds at a fixed thread count
        expected = workload(backend, data, modules)
    finally:
        torch.set_num_threads(threads)
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(backend, data, modules, child_end))
    child.start()
    child_end.close()
    ready = parent_end.poll(120)
    payload = parent_end.recv_bytes() if ready else None
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
    assert ready, "the forked child hung"
    results = torch.load(io.BytesIO(payload)) if payload.startswith(b"PK") else payload.decode()
    assert isinstance(results, dict), f"the forked child failed: {results}"
    assert_bitwise_equal(results, expected, "forked child vs parent")


@pytest.fixture(scope="module")
def second_process_results():
    """Every backend's workload from a fresh process (one for all: its start-up is most of its time),
    at this process's intra-op thread count."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(torch.get_num_threads()), *BACKENDS],
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return torch.load(io.BytesIO(proc.stdout))


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_give_bitwise_equal_results(setup, second_process_results, backend):
    data, modules = setup[backend]
    assert_bitwise_equal(second_process_results[backend], workload(backend, data, modules),
                         "second process vs this one")


if __name__ == "__main__":  # the second process: python test_concurrency.py THREADS BACKEND...
    torch.set_num_threads(int(sys.argv[1]))
    sys.stdout.buffer.write(_serialized({b: workload(b, _inputs(), _modules(b)) for b in sys.argv[2:]}))
