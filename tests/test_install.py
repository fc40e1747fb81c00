"""The install path of the README: a wheel built from the tree with `pip wheel --no-build-isolation`
installs into a fresh environment that already has torch, and imports with its compiled library.

One test, kept cheap: FASTATTN_SKIP_CUDA=1 builds the CPU kernels only (the CUDA build takes minutes
more and is exercised by `make test`'s own build), from a copy of the tree in the test's tmp_path so
the checkout's build/ is untouched. The fresh venv sees torch through a .pth naming the site-packages
of the interpreter running the tests, as the worktrees' venvs do; it has no fastattn of its own.
"""
import glob
import os
import shutil
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_tree(dst):
    """Tracked and new (not ignored) files of the checkout: no .venv, no build output, no _C*.so."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))


def test_wheel_installs_into_a_fresh_environment_with_torch(tmp_path):
    src, wheels, venv = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv"
    _copy_tree(src)
    env = dict(os.environ, FASTATTN_SKIP_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                            "-w", str(wheels), str(src)], env=env, capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = glob.glob(str(wheels / "fastattn-*.whl"))
    shutil.rmtree(src)  # the object files (hundreds of MB with -g); pytest keeps tmp_path around

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = glob.glob(str(venv / "lib" / "python*" / "site-packages"))
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(site, "_torch_site.pth"), "w") as f:
        f.write(torch_site + "\n")
    python = str(venv / "bin" / "python")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                              "--no-index", wheel], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

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
