"""The install path of the README: a wheel built from the tree with `pip wheel --no-build-isolation`
installs into a fresh environment that already has torch, and imports with its compiled library.

The wheel is built from the checkout itself, with the flags of the library the tests run (CUDA kernels or
CPU-only; FASTATTN_SKIP_CUDA=1 in the environment forces CPU-only), so that it compiles in the checkout's
object tree build/temp (setup.py): after `make build` ninja finds every object up to date and the test costs
a link and the packaging, not a second compile of the C++ (it took 106 s of `make test` when it compiled a
CPU-only copy of the tree). The fresh venv sees torch through a .pth naming the site-packages of the
interpreter running the tests, as the worktrees' venvs do; it has no fastattn of its own.
"""
import glob
import os
import subprocess
import sys
import zipfile

import torch

from fastattn import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_env() -> dict:
    """The environment of the wheel's build: that of the tests, CPU-only when the library they load was built
    without CUDA kernels (a CUDA build from scratch would take many minutes)."""
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    if "FASTATTN_SKIP_CUDA" not in env and not _ext.has_kernel("cbam_apply", "CUDA"):
        env["FASTATTN_SKIP_CUDA"] = "1"
    return env


def test_wheel_installs_into_a_fresh_environment_with_torch(tmp_path):
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                            "-w", str(wheels), ROOT], env=_build_env(), capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = glob.glob(str(wheels / "fastattn-*.whl"))
    libraries = [n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("fastattn/_C") and n.endswith(".so")]
    assert len(libraries) == 1, libraries

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = glob.glob(str(venv / "lib" / "python*" / "site-packages"))
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(site, "_torch_site.pth"), "w") as f:
        f.write(torch_site + "\n")
    python = str(venv / "bin" / "python")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                              "--no-index", wheel], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    os.remove(wheel)  # tens of MB with the CUDA kernels; pytest keeps tmp_path around

    probe = ("import fastattn, torch\n"
             "assert fastattn._ext._C is not None, fastattn._LOAD_ERROR\n"
             "x = torch.randn(2, 3, 4, 5)\n"
             "avg, mx, _, _ = torch.ops.fastattn.channel_pool(x, True)\n"
             "torch.testing.assert_close(avg, x.mean((2, 3)))\n"
             "import fastattn.triton_kernels\n"
             "print(fastattn.__file__)")
    run = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().startswith(site), f"fastattn came from {run.stdout.strip()}, not the fresh venv"
