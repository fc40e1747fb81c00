"""The package's structure: production code does not import the tests' oracle (fastattn.reference)."""
import subprocess
import sys


def test_production_code_does_not_import_the_oracle():
    code = ("import sys, torch, fastattn, fastattn.nn, fastattn.functional, fastattn.convert, fastattn._fused_cbam\n"
            "x = torch.randn(2, 16, 5, 5)\n"
            "fastattn.convert(fastattn.twins.TimmCBAM(16))(x).sum().backward()\n"
            "fastattn.spatial_attention(x, x, x, backend='reference')\n"
            "print('fastattn.reference' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "a production module imported fastattn.reference"


# ---------------------------------------------------------------------------
# The op registry (fastattn/_registry.py) against csrc/ops.cpp, the compiled library, the Triton ops,
# the oracle, the autograd formulas, the backend predicates and the README
# ---------------------------------------------------------------------------
import os  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fastattn import _backend, _ext, _ops, _registry, reference  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ops_cpp_schemas() -> dict[str, str]:
    """op name -> "(args) -> returns" from the m.def(...) calls of csrc/ops.cpp (adjacent literals joined)."""
    with open(os.path.join(ROOT, "csrc", "ops.cpp")) as f:
        text = f.read()
    schemas = {}
    for call in re.findall(r"m\.def\(((?:\s*\"[^\"]*\")+)\s*\)", text):
        schema = "".join(re.findall(r"\"([^\"]*)\"", call))
        name, rest = schema.split("(", 1)
        schemas[name] = "(" + rest
    return schemas


def test_registry_matches_ops_cpp():
    assert _ops_cpp_schemas() == {op: spec.schema for op, spec in _registry.OPS.items()}


@pytest.mark.skipif(_ext._C is None, reason="fastattn._C is not built")
@pytest.mark.parametrize("op", list(_registry.OPS))
def test_registry_matches_compiled_schema(op):
    assert str(getattr(torch.ops.fastattn, op).default._schema) == f"fastattn::{op}{_registry.OPS[op].schema}"


@pytest.mark.parametrize("op", list(_registry.OPS))
def test_triton_ops_are_derived_from_the_registry(op):
    spec = _registry.OPS[op]
    assert hasattr(torch.ops.fastattn, "triton_" + op) == spec.triton
    if spec.triton:
        assert str(getattr(torch.ops.fastattn, "triton_" + op).default._schema) == f"fastattn::triton_{op}{spec.schema}"


def test_every_op_has_an_oracle_and_every_formula_exists():
    assert all(callable(getattr(reference, "ref_" + op, None)) for op in _registry.OPS), \
        [op for op in _registry.OPS if not hasattr(reference, "ref_" + op)]
    formulas = {op for op, spec in _registry.OPS.items() if spec.autograd == _registry.FORMULA}
    assert set(_ops._autograd_for(_ops.REFERENCE)) == formulas


@pytest.mark.parametrize("backend,device", [("cpu", "cpu"), ("cuda", "cuda"), ("triton", "cuda")])
@pytest.mark.parametrize("family", ["cbam", "attention"])
def test_registry_dtypes_are_the_backend_predicates(backend, device, family):
    """A backend's predicate refuses a dtype for a family exactly when the registry lists it for none of
    the family's ops on that backend (the predicate may refuse every dtype for another reason, e.g. a
    library built without CUDA kernels; then it must not name a dtype)."""
    family_ops = [op for op, spec in _registry.OPS.items() if spec.family == family and backend in spec.dtypes]
    for dtype in _registry.CPU_DTYPES:
        reason = _backend._PREDICATES[backend](family, torch.device(device), dtype)
        names_dtype = reason is not None and "not " + str(dtype).removeprefix("torch.") in reason
        assert names_dtype == (dtype not in _registry.dtypes(backend, family_ops)), (backend, family, dtype, reason)


def test_readme_support_table_is_the_registry():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for row in _registry.support_table():
        assert row in readme, f"README's support table lacks the registry's row:\n{row}"


# ---------------------------------------------------------------------------
# The repository documents itself: every DESIGN.md reference resolves to a section of docs/DESIGN.md
# ---------------------------------------------------------------------------
def _repo_text_files():
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if rel.endswith((".py", ".cpp", ".cu", ".cuh", ".h", ".md", ".sh", ".toml", ".txt")) or rel == "Makefile":
            path = os.path.join(ROOT, rel)
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    yield rel, f.read()


def test_design_references_resolve():
    with open(os.path.join(ROOT, "docs", "DESIGN.md")) as f:
        design = f.read()
    numbered = set(re.findall(r"^## (\d+)\. ", design, re.M))
    headings = set(re.findall(r"^#+ (.+?)\s*$", design, re.M))
    bad = []
    for rel, text in _repo_text_files():
        if re.search(r"\.\./shared/|/work/" + "shared", text):
            bad.append(f"{rel}: refers to a file outside the repository")
        for number in re.findall(r"DESIGN\.md (?:§|section )(\d+)", text):
            if number not in numbered:
                bad.append(f"{rel}: DESIGN.md §{number} does not exist")
        for title in re.findall(r"DESIGN\.md \"([^\"]+)\"", text):
            if title not in headings:
                bad.append(f"{rel}: DESIGN.md \"{title}\" is no heading")
    assert not bad, "\n".join(bad)
