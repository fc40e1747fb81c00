"""Runs every bad-input case of test_reliability.py in this process and prints one
JSON line per case: {"case", "op", "type", "message", "expect"}. Run as a script, in a
subprocess, so that a case that crashes the interpreter fails the test instead of
taking pytest down with it."""
import os
import sys

import torch

import fastattn


def _t(*shape, dtype=torch.float32, device="cpu"):
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(*shape, dtype=dtype, device=device)
    return torch.ones(*shape, dtype=dtype, device=device)


def attention_cases():
    """(case, argument names the message must contain (any of), overrides of q=k=v=(2, 8, 4, 4), heads=2)."""
    triton_f64 = (dict(q=_t(2, 8, 4, 4, dtype=torch.float64), k=_t(2, 8, 4, 4, dtype=torch.float64),
                       v=_t(2, 8, 4, 4, dtype=torch.float64), backend="triton"))
    meta = dict(q=_t(2, 8, 4, 4, device="meta"), k=_t(2, 8, 4, 4, device="meta"), v=_t(2, 8, 4, 4, device="meta"))
    return [
        ("q rank 2", "q", dict(q=_t(2, 8))),
        ("q rank 5", "q", dict(q=_t(2, 8, 4, 4, 1))),
        ("v rank 1", "v", dict(v=_t(8))),
        ("q 3-D, k and v 4-D", "q", dict(q=_t(2, 8, 16))),
        ("k batch 3", "k", dict(k=_t(3, 8, 4, 4))),
        ("v batch 1", "v", dict(v=_t(1, 8, 4, 4))),
        ("k channels 4 != q's 8", "k", dict(k=_t(2, 4, 4, 4))),
        ("v spatial 3x3 != k's 4x4", "v", dict(v=_t(2, 8, 3, 3))),
        ("k spatial 2x8 != v's 4x4", "k", dict(k=_t(2, 8, 2, 8))),
        ("heads 3 does not divide Cq 8", "heads", dict(heads=3)),
        ("heads 4 does not divide Cv 6", "heads", dict(v=_t(2, 6, 4, 4), heads=4)),
        ("heads 0", "heads", dict(heads=0)),
        ("heads -1", "heads", dict(heads=-1)),
        ("heads 2.0 (float)", "heads", dict(heads=2.0)),
        ("heads True", "heads", dict(heads=True)),
        ("q int64", "q", dict(q=_t(2, 8, 4, 4, dtype=torch.int64))),
        ("k int32", "k", dict(k=_t(2, 8, 4, 4, dtype=torch.int32))),
        ("v uint8", "v", dict(v=_t(2, 8, 4, 4, dtype=torch.uint8))),
        ("q bool", "q", dict(q=_t(2, 8, 4, 4, dtype=torch.bool))),
        ("v complex64", "v", dict(v=_t(2, 8, 4, 4, dtype=torch.complex64))),
        ("q float64, k v float32", "q", dict(q=_t(2, 8, 4, 4, dtype=torch.float64))),
        ("v float16, q k float32", "v", dict(v=_t(2, 8, 4, 4, dtype=torch.float16))),
        ("k on meta, q v on cpu", "k", dict(k=_t(2, 8, 4, 4, device="meta"))),
        ("v on meta, q k on cpu", "v", dict(v=_t(2, 8, 4, 4, device="meta"))),
        ("q a list", "q", dict(q=[[1.0]])),
        ("zero channels", "q", dict(q=_t(2, 0, 4, 4), k=_t(2, 0, 4, 4))),
        ("no key positions, some queries", "k", dict(k=_t(2, 8, 0, 4), v=_t(2, 8, 0, 4))),
        ("backend 'tpu'", "backend", dict(backend="tpu")),
        ("backend cuda on cpu tensors", "backend", dict(backend="cuda")),
        ("backend triton with float64", "backend", triton_f64),
        ("backend cpu with meta tensors", "backend", dict(meta, backend="cpu")),
    ]


def cbam_cases():
    """(case, op, argument names (any of), call) for the three CBAM primitives; x is (2, 3, 4, 4)."""
    x, g, s = _t(2, 3, 4, 4), torch.rand(2, 3), torch.rand(2, 4, 4)
    cp, gsp, ca = fastattn.channel_pool, fastattn.gated_spatial_pool, fastattn.cbam_apply
    cases = []
    for name, op in (("channel_pool", lambda x_: cp(x_)), ("gated_spatial_pool", lambda x_: gsp(x_, g)),
                     ("cbam_apply", lambda x_: ca(x_, g, s))):
        cases += [
            (f"{name}: x rank 3", name, "x", lambda op=op: op(_t(2, 3, 4))),
            (f"{name}: x rank 5", name, "x", lambda op=op: op(_t(2, 3, 4, 4, 1))),
            (f"{name}: x int32", name, "x", lambda op=op: op(_t(2, 3, 4, 4, dtype=torch.int32))),
            (f"{name}: x bool", name, "x", lambda op=op: op(_t(2, 3, 4, 4, dtype=torch.bool))),
            (f"{name}: x complex64", name, "x", lambda op=op: op(_t(2, 3, 4, 4, dtype=torch.complex64))),
            (f"{name}: x a float", name, "x", lambda op=op: op(1.0)),
        ]
    cases += [
        ("channel_pool: no spatial position", "channel_pool", "x", lambda: cp(_t(2, 3, 0, 4))),
        ("channel_pool: backend cuda on cpu", "channel_pool", "backend", lambda: cp(x, backend="cuda")),
        ("channel_pool: backend triton float64", "channel_pool", "backend",
         lambda: cp(x.double(), backend="triton")),
        ("channel_pool: backend cpu on meta", "channel_pool", "backend", lambda: cp(x.to("meta"), backend="cpu")),
        ("channel_pool: backend 'gpu'", "channel_pool", "backend", lambda: cp(x, backend="gpu")),
        ("gated_spatial_pool: ch_gate C 4 != 3", "gated_spatial_pool", "ch_gate", lambda: gsp(x, torch.rand(2, 4))),
        ("gated_spatial_pool: ch_gate N 3 != 2", "gated_spatial_pool", "ch_gate", lambda: gsp(x, torch.rand(3, 3))),
        ("gated_spatial_pool: ch_gate (2, 3, 2, 1)", "gated_spatial_pool", "ch_gate",
         lambda: gsp(x, torch.rand(2, 3, 2, 1))),
        ("gated_spatial_pool: ch_gate rank 3", "gated_spatial_pool", "ch_gate", lambda: gsp(x, torch.rand(2, 3, 1))),
        ("gated_spatial_pool: ch_gate rank 1", "gated_spatial_pool", "ch_gate", lambda: gsp(x, torch.rand(3))),
        ("gated_spatial_pool: ch_gate int64", "gated_spatial_pool", "ch_gate",
         lambda: gsp(x, torch.ones(2, 3, dtype=torch.int64))),
        ("gated_spatial_pool: ch_gate bool", "gated_spatial_pool", "ch_gate",
         lambda: gsp(x, torch.ones(2, 3, dtype=torch.bool))),
        ("gated_spatial_pool: ch_gate float64", "gated_spatial_pool", "ch_gate", lambda: gsp(x, g.double())),
        ("gated_spatial_pool: ch_gate on meta", "gated_spatial_pool", "ch_gate", lambda: gsp(x, g.to("meta"))),
        ("gated_spatial_pool: backend cuda", "gated_spatial_pool", "backend", lambda: gsp(x, g, backend="cuda")),
        ("gated_spatial_pool: ties 'max'", "gated_spatial_pool", "ties", lambda: gsp(x, g, ties="max")),
        ("cbam_apply: sp_gate 4x5 != 4x4", "cbam_apply", "sp_gate", lambda: ca(x, g, torch.rand(2, 4, 5))),
        ("cbam_apply: sp_gate (2, 2, 4, 4)", "cbam_apply", "sp_gate", lambda: ca(x, g, torch.rand(2, 2, 4, 4))),
        ("cbam_apply: sp_gate N 3 != 2", "cbam_apply", "sp_gate", lambda: ca(x, g, torch.rand(3, 4, 4))),
        ("cbam_apply: sp_gate rank 2", "cbam_apply", "sp_gate", lambda: ca(x, g, torch.rand(4, 4))),
        ("cbam_apply: sp_gate rank 5", "cbam_apply", "sp_gate", lambda: ca(x, g, torch.rand(2, 1, 4, 4, 1))),
        ("cbam_apply: ch_gate N 3 != 2", "cbam_apply", "ch_gate", lambda: ca(x, torch.rand(3, 3), s)),
        ("cbam_apply: sp_gate float16", "cbam_apply", "sp_gate", lambda: ca(x, g, s.half())),
        ("cbam_apply: sp_gate int32", "cbam_apply", "sp_gate", lambda: ca(x, g, torch.ones(2, 4, 4, dtype=torch.int32))),
        ("cbam_apply: sp_gate complex64", "cbam_apply", "sp_gate", lambda: ca(x, g, s.to(torch.complex64))),
        ("cbam_apply: sp_gate on meta", "cbam_apply", "sp_gate", lambda: ca(x, g, s.to("meta"))),
        ("cbam_apply: x on meta, gates on cpu", "cbam_apply", "ch_gate", lambda: ca(x.to("meta"), g, s)),
        ("cbam_apply: backend triton float64", "cbam_apply", "backend",
         lambda: ca(x.double(), g.double(), s.double(), backend="triton")),
    ]
    return cases


def all_cases():
    out = []
    for case, arg, override in attention_cases():
        def call(override=override):
            args = dict(q=_t(2, 8, 4, 4), k=_t(2, 8, 4, 4), v=_t(2, 8, 4, 4), heads=2)
            args.update(override)
            return fastattn.spatial_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
        out.append((f"spatial_attention: {case}", "spatial_attention", arg, call))
    return out + cbam_cases()


def main():
    from _util import print_case_results
    print_case_results((dict(case=case, op=op, arg=arg), call) for case, op, arg, call in all_cases())


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
