"""The CPU kernels' cache-size decisions (csrc/cpu/cpu_tuning.{h,cpp}, docs/cpu-tuning.md): the cache
sizes read at run time or forced by FASTATTN_CPU_CACHE, the tiles derived from them, and results that
stay right for every cache size. The sizes are read once per process: each setting runs in its own."""
import os
import subprocess
import sys

import pytest
import torch

import fastattn
from _contract import GRAD_ATOL
from _util import assert_error_rule, compiled_backends

pytestmark = pytest.mark.skipif("cpu" not in compiled_backends("cpu"), reason="needs the compiled cpu backend")

HERE = os.path.dirname(os.path.abspath(__file__))
TUNED = "l1=48K,l2=2M"  # the caches of the machine the fractions were measured on
TINY = "l1=4K,l2=64K,l3=1M"
LARGE = "l1=128K,l2=16M,l3=256M"


def _env(cache: str | None) -> dict:
    env = dict(os.environ)
    env.pop("FASTATTN_CPU_CACHE", None)
    if cache is not None:
        env["FASTATTN_CPU_CACHE"] = cache
    return env


def _tuning(cache: str | None) -> subprocess.CompletedProcess:
    code = "import fastattn; print(repr(fastattn.cpu_tuning()))"
    return subprocess.run([sys.executable, "-c", code], env=_env(cache), capture_output=True, text=True, timeout=120)


def _tuning_dict(cache: str | None) -> dict:
    out = _tuning(cache)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout)


def _sysfs_sizes() -> dict:
    sizes = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    for index in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(f"{base}/{index}/level") as f1, open(f"{base}/{index}/type") as f2, \
                    open(f"{base}/{index}/size") as f3:
                level, kind, size = f1.read().strip(), f2.read().strip(), f3.read().strip()
        except OSError:
            continue
        if kind != "Instruction" and size.endswith("K"):
            sizes[f"l{level}"] = int(size[:-1]) * 1024
    return sizes


def test_sizes_come_from_sysfs_where_it_answers():
    tuning = _tuning_dict(None)
    sysfs = _sysfs_sizes()
    for level in ("l1", "l2", "l3"):
        assert tuning[level] > 0
        if level in sysfs:
            assert tuning[level] == sysfs[level] and tuning["source"][level] == "sysfs", (level, tuning, sysfs)
        else:
            assert tuning["source"][level] in ("sysconf", "default"), tuning


def test_tuned_caches_give_the_measured_constants():
    """At the caches the CPU kernels were tuned for, the tiles are the former constants exactly."""
    tuning = _tuning_dict(TUNED)
    assert tuning["tiles"] == {"lane_tile": 512, "scan_piece": 2048, "l2_block": 512 * 1024,
                               "eval_band": 192 * 1024, "panel_floats": 64 * 1024, "score_tile_floats": 32 * 1024}
    assert tuning["source"]["l1"] == tuning["source"]["l2"] == "FASTATTN_CPU_CACHE"
    assert tuning["source"]["l3"] != "FASTATTN_CPU_CACHE"  # a level the variable leaves out is read


@pytest.mark.parametrize("cache,tiles", [
    ("l1=32K,l2=1M,l3=32M", {"lane_tile": 320, "scan_piece": 1280, "l2_block": 256 * 1024,
                             "eval_band": 96 * 1024, "panel_floats": 32 * 1024, "score_tile_floats": 16 * 1024}),
    (TINY, {"lane_tile": 64, "scan_piece": 256, "l2_block": 16 * 1024,
            "eval_band": 8 * 1024, "panel_floats": 2048, "score_tile_floats": 1024}),
    (LARGE, {"lane_tile": 1024, "scan_piece": 5376, "l2_block": 4 << 20,
             "eval_band": 1536 * 1024, "panel_floats": 512 * 1024, "score_tile_floats": 256 * 1024}),
], ids=["zen4", "tiny", "large"])
def test_override_and_derivation(cache, tiles):
    tuning = _tuning_dict(cache)
    sizes = dict(item.split("=") for item in cache.split(","))
    units = {"K": 1 << 10, "M": 1 << 20}
    assert {k: tuning[k] for k in sizes} == {k: int(v[:-1]) * units[v[-1]] for k, v in sizes.items()}
    assert tuning["tiles"] == tiles


@pytest.mark.parametrize("cache", ["l1=abc", "l4=1M", "l1", "l2=-1M", "l2=1T"])
def test_malformed_override_is_named(cache):
    out = _tuning(cache)
    assert out.returncode != 0
    assert "ValueError" in out.stderr and "FASTATTN_CPU_CACHE" in out.stderr and cache in out.stderr, out.stderr


@pytest.fixture(scope="module")
def results_per_cache(tmp_path_factory):
    results = {}
    for cache in (TINY, TUNED, LARGE):
        path = tmp_path_factory.mktemp("cache") / "results.pt"
        out = subprocess.run([sys.executable, os.path.join(HERE, "_cache_worker.py"), str(path)], env=_env(cache),
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        saved = torch.load(path)
        assert saved["tuning"]["source"]["l1"] == "FASTATTN_CPU_CACHE"
        results[cache] = saved
    return results


@pytest.mark.parametrize("cache", [TINY, TUNED, LARGE], ids=["tiny", "tuned", "large"])
def test_results_meet_the_error_rule_for_every_cache_size(results_per_cache, cache):
    for name, (fused, truth, eager) in results_per_cache[cache]["results"].items():
        if truth is None:  # a parameter without a gradient (an unused bias): none in the fused module either
            assert fused is None, name
            continue
        atol = GRAD_ATOL[fused.dtype] if "-grad-param" in name else None  # whole-module parameter sums
        assert_error_rule(f"{name} at {cache}", fused, truth, eager, atol)


def test_order_free_results_are_bitwise_equal_across_cache_sizes(results_per_cache):
    """Max, argmax and tie counts involve no sum: every tile size gives the same bits. (The sums, means,
    gradients and attention outputs do not: a tile or piece boundary moves where partial sums are
    added, so those meet the error rule above instead.)"""
    tuned = results_per_cache[TUNED]["bitwise"]
    assert tuned
    for cache in (TINY, LARGE):
        other = results_per_cache[cache]["bitwise"]
        assert other.keys() == tuned.keys()
        for name in tuned:
            assert torch.equal(other[name], tuned[name]), f"{name}: {cache} differs from {TUNED}"
