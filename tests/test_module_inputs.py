"""Module-level bad input (issue 19): every fastattn module, and every fused module fastattn.convert
builds, refuses an x of rank 3 or 5, of the wrong channel count, of an integer dtype, on another
device than its parameters (meta, for a CPU-only machine) or not a tensor at all, with a
ValueError/TypeError that names the module, what it expected and what it got.

The cases run in one subprocess (this file run as a script, via _util.run_case_script), so that a
case that crashes the interpreter fails the tests instead of taking pytest down with it. A good
input runs through every module in that process too, so a check that refuses what it should accept
fails here. torch.compile: test_convert's fullgraph tests trace the converted blocks with their
checks; the modules convert never builds (ChannelGate, SpatialGate, the official CBAM) are traced
below.
"""
import os

import pytest
import torch
from torch import nn

import fastattn
from fastattn import reference
from fastattn.nn import FLAVORS
from _util import run_case_script

C = 16  # channels of every module here


def _converted(original: nn.Module, backend: str) -> nn.Module:
    fused = fastattn.convert(original, backend=backend)
    assert type(fused).__module__ == "fastattn.nn", f"convert left {type(original).__name__} alone"
    return fused


def _timm_modules():
    try:
        from timm.layers.cbam import CbamModule, LightCbamModule
        from timm.layers.non_local_attn import NonLocalAttn
    except ImportError:  # timm is a test dependency; without it its rows are left out
        return []
    return [("convert(timm CbamModule)", lambda: CbamModule(C, rd_ratio=1 / 4)),
            ("convert(timm LightCbamModule)", lambda: LightCbamModule(C, rd_ratio=1 / 4)),
            ("convert(timm NonLocalAttn)", lambda: NonLocalAttn(C))]


def modules():
    """(label, factory(backend) -> module, channels its x must have or None for any)."""
    fnn = fastattn.nn
    native = [(f"CBAM {flavor}", lambda b, f=flavor: fnn.CBAM(C, 4, flavor=f, backend=b), C) for flavor in FLAVORS]
    native += [("CBAM official no_spatial", lambda b: fnn.CBAM(C, 4, flavor="official", no_spatial=True, backend=b), C)]
    native += [(f"ChannelGate {flavor}", lambda b, f=flavor: fnn.ChannelGate(C, 4, flavor=f, backend=b), C)
               for flavor in FLAVORS]
    native += [(f"SpatialGate {flavor}", lambda b, f=flavor: fnn.SpatialGate(flavor=f, backend=b), None)
               for flavor in FLAVORS]
    native += [("NonLocal2d", lambda b: fnn.NonLocal2d(C, backend=b), C),
               ("NonLocal2d sub_sample", lambda b: fnn.NonLocal2d(C, sub_sample=True, backend=b), C),
               ("SelfAttention2d", lambda b: fnn.SelfAttention2d(C, backend=b), C),
               ("AttentionBlock2d", lambda b: fnn.AttentionBlock2d(C, 2, groups=4, backend=b), C),
               ("NonLocalAttn", lambda b: fnn.NonLocalAttn(C, backend=b), C)]
    originals = [("convert(OfficialCBAM)", lambda: reference.OfficialCBAM(C, 4)),
                 ("convert(TimmCBAM)", lambda: reference.TimmCBAM(C, 1 / 4)),
                 ("convert(reference.NonLocal2d)", lambda: reference.NonLocal2d(C)),
                 ("convert(reference.SelfAttention2d)", lambda: reference.SelfAttention2d(C)),
                 ("convert(reference.AttentionBlock2d)", lambda: reference.AttentionBlock2d(C, 2, groups=4)),
                 ("convert(TimmNonLocalAttn)", lambda: reference.TimmNonLocalAttn(C))] + _timm_modules()
    return native + [(label, lambda b, make=make: _converted(make(), b), C) for label, make in originals]


def _shape_expected(channels):
    return f"(N, {'C' if channels is None else channels}, H, W)"


# (label, x, exception type, what the message must say was expected (from the module's channels), what it got)
BAD_INPUTS = [
    ("3-D", lambda: torch.randn(2, C, 5), "ValueError", _shape_expected, "(2, 16, 5)"),
    ("5-D", lambda: torch.randn(2, C, 5, 5, 1), "ValueError", _shape_expected, "(2, 16, 5, 5, 1)"),
    ("8 channels", lambda: torch.randn(2, 8, 5, 5), "ValueError", _shape_expected, "(2, 8, 5, 5)"),
    ("int64", lambda: torch.ones(2, C, 5, 5, dtype=torch.int64), "TypeError", lambda _: "floating-point",
     "torch.int64"),
    ("bool", lambda: torch.ones(2, C, 5, 5, dtype=torch.bool), "TypeError", lambda _: "floating-point",
     "torch.bool"),
    ("on meta", lambda: torch.randn(2, C, 5, 5, device="meta"), "ValueError", lambda _: "on cpu", "on meta"),
    ("a list", lambda: [[1.0]], "TypeError", lambda _: "torch.Tensor", "list"),
]
BACKENDS = ("auto", "reference")


def _matrix():
    """(case, module factory, backend, channels, bad input row or None for the good input)."""
    for label, factory, channels in modules():
        for backend in BACKENDS:
            for row in [None] + BAD_INPUTS:
                if row and row[0] == "8 channels" and channels is None:
                    continue  # the spatial gate takes any C
                yield f"{label} [{backend}]: {row[0] if row else 'good'}", factory, backend, channels, row


def cases():
    """(fields, call) for the script side: the module is built and called in the subprocess."""
    out = []
    for case, factory, backend, _, row in _matrix():
        fields = dict(case=case)

        def call(factory=factory, backend=backend, row=row, fields=fields):
            module = factory(backend)
            fields["module_type"] = type(module).__name__
            return module(row[1]() if row else torch.randn(2, C, 6, 6))
        out.append((fields, call))
    return out


CASES = [(case, channels, row) for case, _, _, channels, row in _matrix()]


@pytest.fixture(scope="module")
def results():
    return {r["case"]: r for r in run_case_script(os.path.abspath(__file__))}


@pytest.mark.parametrize("case,channels,row", CASES, ids=[case for case, *_ in CASES])
def test_module_input(results, case, channels, row):
    result = results[case]
    kind, message, module_type = result["type"], result["message"], result.get("module_type")
    assert module_type, f"{case}: building the module failed: {kind}: {message}"
    if row is None:  # the good input
        assert kind == "no error", f"{case}: a good input raised {kind}: {message}"
        return
    _, _, want_type, expected, got = row
    assert kind == want_type, f"{case}: raised {kind}, not {want_type}: {message}"
    assert module_type in message, f"{case}: the message must name the module {module_type}: {message}"
    assert expected(channels) in message, f"{case}: the message must say what was expected: {message}"
    assert got in message, f"{case}: the message must say what it got ({got}): {message}"


def test_checked_modules_compile_fullgraph():
    """One graph, no break (the modules convert builds: test_convert's fullgraph tests). A bad input
    still gets the module's own error: the ValueError where Dynamo can fall back to eager; under
    fullgraph, Dynamo's error, which quotes it."""
    torch._dynamo.reset()
    x = torch.randn(2, C, 6, 6)
    for module in (fastattn.nn.CBAM(C, 4, flavor="official").eval(), fastattn.nn.ChannelGate(C, 4),
                   fastattn.nn.SpatialGate()):
        explained = torch._dynamo.explain(module)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, (module, explained.break_reasons)
    bad = torch.randn(2, C, 6)
    with pytest.raises(ValueError, match=r"SpatialGate expects x of shape \(N, C, H, W\), got x of shape \(2, 16, 6\)"):
        torch.compile(module, backend="eager")(bad)
    with pytest.raises(Exception, match=r"SpatialGate expects x of shape"):
        torch.compile(module, fullgraph=True, backend="eager")(bad)


if __name__ == "__main__":  # the subprocess of the results fixture (tests/ is on sys.path as the script's folder)
    from _util import print_case_results
    print_case_results(cases())
