"""The accuracy contract of the tests, stated once (docs/DESIGN.md §4).

* ground truth: the oracle (fastattn.reference) in float64;
* the error rule: |fused - truth| <= 2 |eager - truth| + atol * max(1, |truth|), elementwise maximum,
  eager being the oracle (or the eager module) in the kernel's dtype; NaN positions must match;
* ATOL per dtype, and GRAD_ATOL for parameter gradients of whole modules;
* values that must not differ at all (max values, argmax indices, tie counts, repeat calls) are
  compared bitwise with assert_equal_values.

tests/_util.py re-exports these names; test files import either.
"""
from __future__ import annotations

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# Parameter gradients of whole modules sum a kernel's per-position rounding over every
# position, through convs and BatchNorm, and often cancel to something small: their atol is
# 10 x ATOL (relative to max(1, |truth|)); the op-level tests hold kernels to ATOL. In float16 and
# bfloat16 the eager module's own error on such a sum is a matter of luck: over 1200 random
# nn.CBAM cases (tests/test_fuzz.py) fastattn's errors had the eager module's median and 90th
# percentile in every dtype, yet 0.4-1.4% of the reduced-precision parameter gradients
# exceeded 2 x (a lucky eager error) + ATOL, by up to 5e-2 relative in bfloat16.
GRAD_ATOL = {dtype: 10 * atol for dtype, atol in ATOL.items()}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; NaN against NaN and equal infinities count as no error."""
    a, b = a.double(), b.double()
    both_nan = a.isnan() & b.isnan()
    same_inf = (a == b) & a.isinf()
    diff = (a - b).abs().masked_fill(both_nan | same_inf, 0)
    return diff.max().item() if diff.numel() else 0.0


def assert_error_rule(name: str, fused: torch.Tensor, truth: torch.Tensor, eager: torch.Tensor,
                      atol: float | None = None) -> None:
    """|fused - truth| <= 2 |eager - truth| + atol, elementwise maximum; prints both on failure."""
    assert fused.shape == truth.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(truth.shape)}"
    assert torch.equal(fused.isnan(), truth.isnan()), f"{name}: NaN positions differ from the reference"
    atol = ATOL[fused.dtype] if atol is None else atol
    scale = max(1.0, truth.double().abs().nan_to_num(0, 0, 0).max().item()) if truth.numel() else 1.0
    fused_err, eager_err = max_err(fused, truth), max_err(eager, truth)
    assert fused_err <= 2 * eager_err + atol * scale, (
        f"{name}: fused error {fused_err:.3e} > 2 x eager error {eager_err:.3e} + atol {atol * scale:.1e}")


def assert_equal_values(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """Same shape, dtype and values: NaN where ref has NaN, -0 == +0; names the first difference."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype}, reference {ref.dtype}"
    same = (out == ref) | (out.isnan() & ref.isnan()) if out.is_floating_point() else out == ref
    bad = (~same).nonzero()
    assert bad.numel() == 0, (
        f"{name}: {bad.shape[0]} of {out.numel()} entries differ, first at {bad[0].tolist()}: "
        f"got {out[tuple(bad[0])].item()!r}, reference {ref[tuple(bad[0])].item()!r}")
