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
