"""The benchmark harness itself (bench/): quick mode on tiny shapes into a tmp folder.

Checks the JSON schema that bench/README.md documents, that every provider of
every case produced a number or a failure record (a deliberately failing
provider is reported, not dropped), peak memory and resident-set readings
included, and that the plots and summary were written.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import allocator, cases, memory, report, timing  # noqa: E402
from bench.providers import INJECTED_FAILURE  # noqa: E402

TOP_KEYS = {"schema", "device", "mode", "families", "dtypes", "complete", "environment", "memory", "timing",
            "roofline", "cases"}
ENV_KEYS = {"date", "python", "torch", "triton", "timm", "fastattn", "git_commit", "device_type", "cpu_model",
            "threads", "allocator", "load_average_start", "load_average_end"}
CASE_KEYS = {"id", "family", "group", "label", "pass", "dtype", "params", "sweep", "work", "providers", "results",
             "rate_unit", "roofline_value", "best_other", "ratios", "wall_s", "hurried", "load_average"}
OK_KEYS = {"status", "first_call_s", "info", "median_ms", "min_ms", "times_ms", "repeats", "rate", "pct_roofline"}
FAILED_KEYS = {"status", "stage", "error", "traceback"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the kernel tests; the bench runs no Triton on a CPU
    # torch.compile's "eager" backend: the compile provider's plumbing without minutes of inductor codegen;
    # one thread: on a loaded 2-core machine two OpenMP threads wait on each other at every op (20x slower)
    cmd = [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--inject-failure",
           "--compile-backend", "eager", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"python -m bench --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    jsons = list(out.glob("*.json"))  # and no *.partial.json left behind
    assert len(jsons) == 1, f"expected one JSON in {out}, found {jsons}"
    with open(jsons[0]) as f:
        return json.load(f), out, jsons[0].name[:-len(".json")], proc.stdout


def test_schema(quick_run):
    result, _, stem, _ = quick_run
    assert TOP_KEYS <= result.keys(), TOP_KEYS - result.keys()
    assert result["schema"] == "fastattn-bench/1" and result["complete"] is True
    assert result["mode"] == "quick" and stem == result["device"] + "-quick"
    assert result["families"] == ["cbam", "attention", "models"]
    env = result["environment"]
    assert ENV_KEYS <= env.keys(), ENV_KEYS - env.keys()
    assert env["threads"] >= 1 and {"mode", "detail"} <= env["allocator"].keys()
    roof = result["roofline"]
    assert roof["copy"]["gbs"] > 0 and roof["matmul"]["float32"]["gflops"] > 0
    assert {c["family"] for c in result["cases"]} == {"cbam", "attention", "models"}
    for case in result["cases"]:
        assert CASE_KEYS <= case.keys(), (case["id"], CASE_KEYS - case.keys())
        assert {"unit", "amount", "formula", "roofline"} <= case["work"].keys()
        assert case["work"]["amount"] > 0


def test_every_provider_has_a_number_or_a_failure(quick_run):
    result, *_ = quick_run
    for case in result["cases"]:
        assert set(case["results"]) == set(case["providers"]), case["id"]
        assert INJECTED_FAILURE in case["providers"], case["id"]
        for name, res in case["results"].items():
            where = f"{case['id']} / {name}"
            if res["status"] == "ok":
                assert OK_KEYS <= res.keys(), (where, OK_KEYS - res.keys())
                assert math.isfinite(res["median_ms"]) and res["median_ms"] > 0, where
                assert len(res["times_ms"]) == res["repeats"] >= 1, where
                assert res["rate"] > 0, where
                if case["pass"] in ("fwd+bwd", "train"):
                    assert "peak_mem_mib" in res or "peak_mem_error" in res, where
                    # --quick takes a resident-set reading of every provider of every fwd+bwd/train case on the CPU
                    if result["environment"]["device_type"] == "cpu":
                        assert "peak_rss_mib" in res or res.get("peak_rss_error"), where
                        if "peak_rss_mib" in res:
                            assert math.isfinite(res["peak_rss_mib"]) and res["peak_rss_mib"] >= 0, where
                            assert res["rss_base_mib"] > 0, where
            else:
                assert res["status"] == "failed", where
                assert FAILED_KEYS <= res.keys(), (where, FAILED_KEYS - res.keys())
                assert res["error"], where
        injected = case["results"][INJECTED_FAILURE]
        assert injected["status"] == "failed" and "injected failure" in injected["error"], case["id"]
        # the harness measured something real in every case: at least one provider other than fastattn
        assert any(r["status"] == "ok" for n, r in case["results"].items() if not n.startswith("fastattn-")), \
            case["id"]


def test_autocast_case(quick_run):
    """The mixed-precision CBAM case: x in the autocast dtype, float32 parameters, every provider under
    torch.autocast; the fused module stays fused there (tests/test_cbam_modules.py checks its numbers)."""
    result, *_ = quick_run
    (fwd, train) = sorted((c for c in result["cases"] if c["params"].get("autocast")), key=lambda c: c["pass"])
    assert fwd["dtype"] == train["dtype"] == cases.AUTOCAST_DTYPE[result["environment"]["device_type"]]
    for case in (fwd, train):
        assert case["results"]["timm"]["status"] == "ok", case["results"]["timm"]
        assert report._case_name(case).endswith(f"autocast {case['dtype']}")


def test_reference_backend_and_ratios(quick_run):
    result, *_ = quick_run
    for case in result["cases"]:
        if case["family"] == "models":
            continue  # convert() may have nothing to replace yet: a failure record then
        ref = case["results"]["fastattn-reference"]
        assert ref["status"] == "ok", (case["id"], ref.get("error"))
        ratio = case["ratios"]["fastattn-reference"]
        assert ratio["best_other"] in case["providers"] and ratio["vs_best_other"] > 0
        assert set(ratio["vs"]) == {n for n, r in case["results"].items()
                                    if r["status"] == "ok" and n != "fastattn-reference"}


def test_cold_column_and_memory(quick_run):
    result, *_ = quick_run
    if result["environment"]["device_type"] == "cpu" and allocator.available():
        fwd = [c for c in result["cases"] if c["family"] == "cbam" and c["pass"] == "fwd"]
        assert fwd and all("cold_median_ms" in c["results"]["timm"] for c in fwd)
    train = [c for c in result["cases"] if c["pass"] in ("fwd+bwd", "train")]
    assert all(r.get("peak_mem_mib", 0) > 0 for c in train for r in c["results"].values() if r["status"] == "ok")
    # fastattn's reference backend runs the eager formula itself: the allocation trace must read the same
    for case in (c for c in train if c["family"] == "attention"):
        assert case["results"]["fastattn-reference"]["peak_mem_mib"] == case["results"]["eager"]["peak_mem_mib"]
    if result["environment"]["device_type"] != "cpu":
        return
    rss = result["memory"]["rss"]
    assert rss["malloc_env"] == memory.MALLOC_ENV and rss["cases"] == "every fwd+bwd and train case"
    # and so must the resident set, each in a process of its own, with the heap's behaviour fixed
    for case in (c for c in train if c["family"] == "attention"):
        ref, eager = (case["results"][n].get("peak_rss_mib") for n in ("fastattn-reference", "eager"))
        assert ref is not None and eager is not None and abs(ref - eager) <= 0.25, (case["id"], ref, eager)


def test_outputs_written(quick_run):
    result, out, stem, stdout = quick_run
    for suffix in ("-time.png", "-roofline.png"):
        path = out / (stem + suffix)
        assert path.exists(), path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    summary = (out / (stem + ".md")).read_text()
    assert result["device"] in summary and "injected-failure" in summary
    assert "injected-failure" in stdout and "FAILED" in stdout
    assert "RSS MiB" in stdout and "resident set" in summary


def test_resident_set_failures_are_recorded():
    """A provider that fails in the measuring process, or one that outlives the time-out, gives a failure record;
    the probe starts a new server after a time-out and goes on."""
    case = next(c for c in cases.build("quick", ["cbam"], ["float32"], "cpu") if c.pass_ == "fwd+bwd")
    with memory.RSSProbe("eager", 1) as probe:
        failed = probe.measure(case, INJECTED_FAILURE)
        assert failed["status"] == "failed" and failed["stage"] == "rss", failed
        assert "injected failure" in failed["error"] and "InjectedFailure" in failed["traceback"], failed
        probe.timeout_s = 0.01  # less than the server's start-up
        late = probe.measure(case, "timm")
        assert late["status"] == "failed" and "no result after" in late["error"], late
        probe.timeout_s = memory.RSS_TIMEOUT_S
        reading = probe.measure(case, "timm")
        assert reading["status"] == "ok" and reading["peak_rss_mib"] >= 0 and reading["base_rss_mib"] > 0, reading


# ---------------------------------------------------------------------------
# Pieces of the harness, in process
# ---------------------------------------------------------------------------
def test_round_robin_keeps_going_after_a_failure():
    import torch
    calls = []

    def broken():
        raise RuntimeError("boom")

    times, errors = timing.round_robin({"a": lambda: calls.append("a"), "bad": broken,
                                        "b": lambda: calls.append("b")}, 3, timing.Clock(torch.device("cpu")))
    assert set(times) == {"a", "b"} and all(len(t) == 3 for t in times.values())
    assert set(errors) == {"bad"} and calls.count("a") == 3
    assert timing.median([3.0, 1.0, 2.0]) == 2.0 and timing.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert timing.plan_repeats(1.0, 2.5, 3, 15) == 3 and timing.plan_repeats(0.1, 2.5, 3, 15) == 15


def test_ratios_and_roofline_arithmetic():
    result = {"roofline": {"copy": {"gbs": 10.0}, "matmul": {"float32": {"gflops": 100.0}}},
              "cases": [{"work": {"unit": "byte", "amount": 4e9, "roofline": "copy"},
                         "results": {"fastattn-cpu": {"status": "ok", "median_ms": 500.0},
                                     "timm": {"status": "ok", "median_ms": 2000.0},
                                     "compile": {"status": "ok", "median_ms": 1000.0},
                                     "broken": {"status": "failed", "stage": "setup", "error": "x"}}}]}
    report.annotate(result)
    case = result["cases"][0]
    fa = case["results"]["fastattn-cpu"]
    assert fa["rate"] == pytest.approx(8.0) and fa["pct_roofline"] == pytest.approx(80.0)
    assert case["best_other"] == "compile"
    assert case["ratios"]["fastattn-cpu"]["vs"] == {"timm": pytest.approx(4.0), "compile": pytest.approx(2.0)}
    assert case["ratios"]["fastattn-cpu"]["vs_best_other"] == pytest.approx(2.0)


def test_full_mode_cases_and_sweep_plots(tmp_path):
    from bench import plots
    full = cases.build("full", list(cases.FAMILIES), ["float32"], "cpu")
    default = cases.build("default", list(cases.FAMILIES), ["float32"], "cpu")
    assert {c.id for c in default} < {c.id for c in full}
    assert len([c for c in default if c.family == "cbam"]) == 10
    autocast = [c for c in default if c.params.get("autocast")]  # mixed precision: the main shape
    assert {(c.label, c.dtype) for c in autocast} == {("8x256x56x56", "bfloat16")}
    assert len([c for c in full if c.params.get("autocast")]) == 8
    assert {c.dtype for c in cases.build("default", ["cbam"], ["float32"], "cuda") if c.params["autocast"]} == {
        "float16"}
    assert len([c for c in default if c.family == "attention"]) == 10
    assert sorted(c.label for c in default if c.family == "models") == ["resnet18-cbam", "resnet26-nl"]
    sweep_l = sorted({c.sweep[1] for c in full if c.group == "sweep-L"})
    sweep_d = sorted({c.sweep[1] for c in full if c.group == "sweep-d"})
    assert sweep_l[0] == 196 and sweep_l[-1] == 16384 and sweep_d[0] == 32 and sweep_d[-1] == 512
    assert {c.pass_ for c in full if c.family == "models"} == {"train", "infer"}
    assert {c.params["shape"][0] for c in full if c.family == "cbam"} == {1, 8, 32}

    # the plots of a --full run, from made-up times (no measuring here)
    picked = [c for c in full if c.group in ("sweep-L", "resnet50-stages")]
    result = {"device": "cpu-test-1t", "families": ["cbam", "attention"],
              "roofline": {"copy": {"gbs": 10.0}, "matmul": {"float32": {"gflops": 100.0}}}, "cases": []}
    for i, c in enumerate(picked):
        results = {"eager": {"status": "ok", "median_ms": 1.0 + i},
                   "fastattn-cpu": {"status": "failed", "stage": "setup", "error": "not built"}}
        result["cases"].append({"id": c.id, "family": c.family, "group": c.group, "label": c.label, "pass": c.pass_,
                                "dtype": c.dtype, "sweep": list(c.sweep) if c.sweep else None,
                                "work": cases.work(c), "providers": list(results), "results": results})
    report.annotate(result)
    paths = plots.write_all(result, str(tmp_path), "cpu-test-1t-full")
    assert sorted(os.path.basename(p) for p in paths) == [
        "cpu-test-1t-full-roofline.png", "cpu-test-1t-full-sweeps.png", "cpu-test-1t-full-time.png"]
    assert all(os.path.getsize(p) > 0 for p in paths)


def test_deadline_hurries_cases_without_dropping_them(capsys):
    from bench import run
    default = run.Settings.for_mode("default", "inductor")
    assert default.deadline_s == 240.0 and run.Settings.for_mode("full", "inductor").deadline_s is None
    assert run.parse_args(["--deadline", "90"]).deadline == 90.0 and run.parse_args([]).deadline is None
    on_time = default.for_case(elapsed_s=0.0, cases_left=4)  # 60 s a case: the full settings
    assert on_time == default
    late = default.for_case(elapsed_s=230.0, cases_left=10)  # 1 s a case: one round, no warm-up
    assert late.hurried and late.min_repeats == 1 and late.warmup == 0 and late.budget_s == pytest.approx(0.25)
    assert run.main(["--deadline", "0", "--only", "cbam"]) == 2
    assert "--deadline must be positive" in capsys.readouterr().err
