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
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import allocator, allocator_columns, cases, memory, report, timing  # noqa: E402
from bench.providers import INJECTED_FAILURE  # noqa: E402

TOP_KEYS = {"schema", "device", "mode", "families", "dtypes", "dtype_note", "complete", "environment", "memory",
            "timing", "allocators", "roofline", "cases"}
ENV_KEYS = {"date", "python", "torch", "triton", "timm", "fastattn", "git_commit", "device_type", "cpu_model",
            "threads", "allocator", "load_average_start", "load_average_end"}
CASE_KEYS = {"id", "family", "group", "label", "pass", "dtype", "params", "sweep", "work", "providers", "results",
             "rate_unit", "roofline_value", "best_other", "ratios", "wall_s", "hurried", "load_average"}
OK_KEYS = {"status", "first_call_s", "info", "median_ms", "min_ms", "times_ms", "repeats", "rate", "pct_roofline"}
FAILED_KEYS = {"status", "stage", "error", "traceback"}


def _bench_env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the kernel tests; the bench runs no Triton on a CPU
    return env


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # torch.compile's "eager" backend: the compile provider's plumbing without minutes of inductor codegen;
    # one thread: on a loaded 2-core machine two OpenMP threads wait on each other at every op (20x slower);
    # the default allocator's column (the headline) for every case; the preloaded ones: test_allocator_columns
    cmd = [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--inject-failure",
           "--compile-backend", "eager", "--threads", "1", "--allocators", "default"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_bench_env(), capture_output=True, text=True, timeout=900)
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


def test_headline_is_the_default_allocator(quick_run):
    """On the CPU every figure of the table is the default allocator's, timed in processes of their own; the
    in-process (warm) figures and each column's ratios are kept beside it."""
    result, _, _, stdout = quick_run
    if result["environment"]["device_type"] != "cpu":
        pytest.skip("allocator columns are a CPU matter")
    columns = result["allocators"]
    assert columns["headline"] == "default" and columns["in_process"] == "warm"
    assert columns["columns"]["default"]["status"] == "measured" and set(columns["columns"]) == {"warm", "default"}
    for case in result["cases"]:
        for name, res in case["results"].items():
            if res["status"] != "ok":
                assert name == INJECTED_FAILURE, (case["id"], name, res["error"])
                continue
            where = f"{case['id']} / {name}"
            default, warm = res["allocators"]["default"], res["allocators"]["warm"]
            assert res["allocator"] == "default" and default["status"] == warm["status"] == "ok", where
            assert res["median_ms"] == default["median_ms"] and len(default["times_ms"]) == default["repeats"] >= 1
            assert math.isfinite(warm["median_ms"]) and warm["median_ms"] > 0, where
            assert default["first_call_s"] > 0 and default["minor_faults_per_call"] >= 0, where
            if name.startswith("fastattn-"):
                assert set(case["ratios"][name]["by_allocator"]) == {"default", "warm"}, where
    assert "warm ms" in stdout and "median ms = default allocator" in stdout


def test_bfloat16_cases(quick_run):
    """--quick runs CBAM and attention in bfloat16 besides float32 (the default run does where the CPU has
    bfloat16 arithmetic): every provider gives a number, against a bfloat16 matmul roofline."""
    result, *_ = quick_run
    assert result["dtypes"] == ["float32", "bfloat16"]
    for family in ("cbam", "attention"):
        bf16 = [c for c in result["cases"] if c["family"] == family and c["dtype"] == "bfloat16"
                and not c["params"].get("autocast")]
        f32 = [c for c in result["cases"] if c["family"] == family and c["dtype"] == "float32"]
        assert bf16 and [c["label"] for c in bf16] == [c["label"] for c in f32], family
        for case in bf16:
            failed = {n: r["error"] for n, r in case["results"].items() if r["status"] != "ok" and n != INJECTED_FAILURE}
            assert not failed, (case["id"], failed)
    assert result["roofline"]["matmul"]["bfloat16"]["gflops"] > 0
    assert all(c["roofline_value"] for c in result["cases"] if c["family"] == "attention")


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
    assert default.deadline_s == 360.0 and run.Settings.for_mode("full", "inductor").deadline_s is None
    # a case timed under three allocators gets a third of the time for each timing
    assert default.for_case(elapsed_s=0.0, cases_left=20) == default
    assert default.for_case(elapsed_s=0.0, cases_left=20, timings=3).budget_s == pytest.approx(360 / 20 / 3 / 4)
    assert run.parse_args(["--deadline", "90"]).deadline == 90.0 and run.parse_args([]).deadline is None
    on_time = default.for_case(elapsed_s=0.0, cases_left=4)  # 90 s a case: the full settings
    assert on_time == default
    late = default.for_case(elapsed_s=350.0, cases_left=10)  # 1 s a case: one round, no warm-up
    assert late.hurried and late.min_repeats == 1 and late.warmup == 0 and late.budget_s == pytest.approx(0.25)
    assert run.main(["--deadline", "0", "--only", "cbam"]) == 2
    assert "--deadline must be positive" in capsys.readouterr().err
    assert run.main(["--cases", "no-such-case,nor-this"]) == 2
    assert "no case id contains any of no-such-case, nor-this" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# GPU baselines: providers, FLOP and peak arithmetic (no GPU needed)
# ---------------------------------------------------------------------------
def test_provider_sets_per_device(monkeypatch):
    from bench import providers
    from fastattn import _verified
    sdpa_forced = ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math"]
    gpu = providers.names("attention", "cuda")
    assert gpu == ["fastattn-cuda", "fastattn-triton", "fastattn-reference", "eager", "sdpa", *sdpa_forced,
                   "flash-attn", "compile"]
    # the CPU run keeps its providers (and its time); sdpa is the user's call there too
    assert providers.names("attention", "cpu") == ["fastattn-cpu", "fastattn-reference", "eager", "sdpa", "compile"]
    assert set(providers.known("attention", "cpu")) - set(providers.names("attention", "cpu")) == {
        "sdpa-nchw-views", *sdpa_forced}
    assert providers.names("cbam", "cuda") == ["fastattn-cuda", "fastattn-triton", "fastattn-reference", "timm",
                                               "compile"]
    # --unverified: a provider per backend with a variant that has not passed on a GPU, none once it has
    monkeypatch.setattr(_verified, "VARIANTS", {
        "cuda_attention_mma": _verified.Variant("new"), "triton_attention_v2": _verified.Variant("new"),
        "triton_cbam_wide": _verified.Variant("new", verified="bench/results/some.log")})
    with_new = providers.names("attention", "cuda", unverified=True)
    assert with_new[:5] == ["fastattn-cuda", "fastattn-triton", "fastattn-reference", "fastattn-cuda-unverified",
                            "fastattn-triton-unverified"]
    assert providers.names("cbam", "cuda", unverified=True) == providers.names("cbam", "cuda")
    assert providers.names("attention", "cpu", unverified=True) == providers.names("attention", "cpu")
    assert providers.fastattn_backend("fastattn-triton-unverified") == ("triton", True)
    assert providers.fastattn_backend("fastattn-cuda") == ("cuda", False)


def test_gpu_target_cases():
    gpu = cases.build("default", ["attention"], ["float32", "bfloat16"], "cuda")
    targets = {(c.label, c.dtype) for c in gpu if c.group == "gpu-targets"}
    assert targets == {(label, d) for label in cases.GPU_TARGETS for d in ("float16", "bfloat16")}
    p = next(c for c in gpu if c.label == "nonlocal 4x512x64x64 h8").params
    assert (p["n"], p["cq"], p["cv"], p["hq"] * p["wq"], p["heads"]) == (4, 512, 512, 4096, 8)
    assert not [c for c in cases.build("default", ["attention"], ["float32"], "cpu") if c.group == "gpu-targets"]


def test_attention_flop_and_percent_of_peak():
    from bench import roofline
    # 4 * N * heads * L^2 * d (d_qk = d_v): U-Net 8x320x32x32, 8 heads of 40
    unet = next(c for c in cases.build("default", ["attention"], ["float16"], "cuda")
                if c.label == "unet 8x320x32x32 h8" and c.dtype == "float16")
    assert cases.work(unet)["amount"] == 4 * 8 * 8 * 1024 ** 2 * 40
    train = cases.Case("attention", "g", "l", "fwd+bwd", "float16", unet.params)
    assert cases.work(train)["amount"] == 3.5 * cases.work(unet)["amount"]  # backward = 2.5 x forward

    assert roofline.dense_peak("NVIDIA H100 80GB HBM3")["tflops"] == {
        "float16": 989.0, "bfloat16": 989.0, "tf32": 495.0, "float32": 67.0}
    assert roofline.dense_peak("NVIDIA H200")["device"] == "H200"
    assert roofline.dense_peak("NVIDIA A100-SXM4-80GB")["tflops"]["bfloat16"] == 312.0
    for unknown in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "Tesla V100-SXM2-16GB", "", None):
        assert roofline.dense_peak(unknown) is None, unknown

    def run(peak):
        # 98.9 TFLOP in 100 ms: 989 TFLOP/s, 100% of an H100's fp16 peak; 80 GB moved in 40 ms: 2000 GB/s
        return {"environment": {"device_type": "cuda"},
                "roofline": {"copy": {"gbs": 2500.0}, "matmul": {"float16": {"gflops": 700e3}}, "peak": peak},
                "cases": [{"dtype": "float16", "work": {"unit": "flop", "amount": 98.9e12, "roofline": "matmul/float16"},
                           "results": {"sdpa": {"status": "ok", "median_ms": 100.0}}},
                          {"dtype": "float16", "work": {"unit": "byte", "amount": 80e9, "roofline": "copy"},
                           "results": {"timm": {"status": "ok", "median_ms": 40.0}}}]}
    result = run(roofline.dense_peak("NVIDIA H100 80GB HBM3"))
    report.annotate(result)
    attn, cbam = result["cases"]
    sdpa = attn["results"]["sdpa"]
    assert attn["rate_unit"] == "TFLOP/s" and attn["peak_tflops"] == 989.0
    assert sdpa["rate"] == pytest.approx(989.0) and sdpa["pct_peak"] == pytest.approx(100.0)
    assert sdpa["pct_roofline"] == pytest.approx(100.0 * 989 / 700)  # of the measured fp16 matmul
    assert cbam["rate_unit"] == "GB/s" and cbam["results"]["timm"]["pct_roofline"] == pytest.approx(80.0)
    assert "pct_peak" not in cbam["results"]["timm"]
    unknown = run(None)
    report.annotate(unknown)
    assert "pct_peak" not in unknown["cases"][0]["results"]["sdpa"] and "peak_tflops" not in unknown["cases"][0]


def _attention_case(label: str, pass_: str = "fwd"):
    return next(c for c in cases.build("quick", ["attention"], ["float32"], "cpu")
                if c.label == label and c.pass_ == pass_)


@pytest.mark.parametrize("label", ["heads2 2x32x8x8", "sagan 2x16 8x8/4x4"])
def test_sdpa_as_a_user_calls_it_equals_the_reference(label):
    """sdpa: permute to (N, heads, L, d), contiguous, SDPA, permute back; values and gradients as the
    reference's, on maps with several heads and with d_v != d_qk."""
    import torch
    from bench import providers
    from fastattn import reference
    train = _attention_case(label, "fwd+bwd")
    inputs = providers.make_inputs(train, torch.device("cpu"))
    q, k, v, heads, scale = (inputs[key] for key in ("q", "k", "v", "heads", "scale"))
    got = providers.sdpa_user(q, k, v, heads, scale)
    want = reference.spatial_attention(q, k, v, heads=heads, scale=scale)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    grads = [torch.autograd.grad(out, (q, k, v), inputs["grad_out"]) for out in (got, want)]
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5)
    assert providers.sdpa_choice(q, k, v, heads, scale) in ("FLASH_ATTENTION", "MATH", None)


def test_a_refusing_sdpa_kernel_is_a_failure_with_its_reason():
    """A forced SDPA kernel that cannot run the case, and flash-attn where it is not installed, are failure
    records with the reason; the providers that can run still give numbers."""
    import importlib.util
    import torch
    from bench import run
    settings = run.Settings.for_mode("quick", "eager")
    settings.memory = False
    names = ["sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-math", "flash-attn"]
    record = run.run_case(_attention_case("sagan 2x16 8x8/4x4"), names, torch.device("cpu"),
                          timing.Clock(torch.device("cpu")), settings)
    res = record["results"]
    assert [n for n in names if res[n]["status"] == "ok"] == ["sdpa", "sdpa-math"]
    assert res["sdpa-flash"]["stage"] == "setup" and res["sdpa-flash"]["error"].startswith("SdpaRefused")
    assert "same last dimension" in res["sdpa-flash"]["error"]  # PyTorch's reason: d_v != d_qk
    assert "flash and math kernels only" in res["sdpa-cudnn"]["error"]
    if importlib.util.find_spec("flash_attn") is None:
        assert "flash-attn not installed" in res["flash-attn"]["error"]
    assert res["sdpa"]["info"]["sdpa_kernel"] in ("MATH", None)


def test_unverified_provider_runs_under_the_switch(monkeypatch):
    """fastattn-<backend>-unverified: FASTATTN_UNVERIFIED_KERNELS=1 during its set-up and each call, as before
    afterwards; the variants' state is recorded."""
    import torch
    import fastattn
    from bench import providers
    from fastattn import _verified
    monkeypatch.delenv(_verified.ENV, raising=False)
    seen = []
    original = fastattn.spatial_attention
    monkeypatch.setattr(fastattn, "spatial_attention",
                        lambda *a, **kw: seen.append(os.environ.get(_verified.ENV)) or original(*a, **kw))
    case = _attention_case("heads2 2x32x8x8")
    inputs = providers.make_inputs(case, torch.device("cpu"))
    prepared = providers.prepare("fastattn-reference-unverified", case, inputs)
    prepared.run()
    prepared.run()
    assert seen == ["1", "1"] and _verified.ENV not in os.environ
    assert all(": on, unverified" in line for line in prepared.info["kernel_variants"].splitlines())
    providers.prepare("fastattn-reference", case, inputs).run()
    assert seen[-1] is None


# ---------------------------------------------------------------------------
# bench/gpu_session.sh: the plan, and its steps run with a stand-in python (no GPU here)
# ---------------------------------------------------------------------------
SESSION = os.path.join(ROOT, "bench", "gpu_session.sh")
SESSION_STEPS = ["build", "test", "test-unverified", "sanitize", "bench"]


def _session(tmp_path, **env):
    return subprocess.run(["bash", SESSION], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, OUT=str(tmp_path / "out"), LOGDIR=str(tmp_path / "logs"), **env))


def test_session_script_plan_fits_one_device_call(tmp_path):
    sanitizer = tmp_path / "gpu_sanitize.sh"
    for present in (False, True):
        if present:
            sanitizer.write_text("true\n")
        proc = _session(tmp_path, DRY_RUN="1", SANITIZER=str(sanitizer))
        assert proc.returncode == 0, proc.stderr
        steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
        assert [line.split(":")[0].removeprefix("step ") for line in steps] == SESSION_STEPS
        seconds = [int(line.split(": ")[1].split(" s")[0]) for line in steps]
        total = int(proc.stdout.split("TOTAL ")[1].split(" s")[0])
        # every step's time-out fits TOTAL as planned; the script cuts a step to what is left of TOTAL, so
        # the call ends by TOTAL + the last step's 5 s of SIGKILL grace: inside one 600 s device call
        assert sum(seconds) <= total and total + 5 <= 590
        plan = dict(zip(SESSION_STEPS, steps))
        assert "FASTATTN_UNVERIFIED_KERNELS=1" in plan["test-unverified"]
        assert "FASTATTN_UNVERIFIED_KERNELS" not in plan["test"]
        assert "--unverified" in plan["bench"] and "sdpa-flash" in plan["bench"] and "gpu-targets" in plan["bench"]
        assert (f"bash {sanitizer}" in plan["sanitize"]) == present and ("absent" in plan["sanitize"]) != present
        assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()  # a dry run writes nothing


_STAND_IN = """#!/usr/bin/env bash
echo "unverified=${FASTATTN_UNVERIFIED_KERNELS:-} $*" >> "$CALLS"
[ "$1" = -c ] && exit 1               # 'import xdist' and friends: absent
[ "$2" = pip ] && exit "${BUILD_RC:-0}"
exit 0
"""


def _steps_run(calls) -> list[str]:
    """The stand-in's calls, less the probes (python -c ...)."""
    return [line for line in calls.read_text().splitlines() if line.split(" ", 1)[1].split()[0] != "-c"]


def test_session_script_runs_each_step_with_its_settings(tmp_path):
    calls, stand_in, sanitizer = tmp_path / "calls", tmp_path / "python", tmp_path / "gpu_sanitize.sh"
    stand_in.write_text(_STAND_IN)
    stand_in.chmod(0o755)
    sanitizer.write_text('echo "sanitizer OUT=$OUT SANITIZE_TIME=$SANITIZE_TIME" >> "$CALLS"\n')
    env = {"PY": str(stand_in), "CALLS": str(calls), "SANITIZER": str(sanitizer), "PATH": os.environ["PATH"]}
    proc = _session(tmp_path, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ran = _steps_run(calls)
    assert len(ran) == 5, ran
    assert ran[0] == "unverified= -m pip install -q --no-build-isolation --no-deps -e ."
    assert ran[1].startswith("unverified= -m pytest") and " tests -k cuda or triton or gpu" in ran[1]
    assert ran[2].startswith("unverified=1 -m pytest") and "test_cuda_attention_ops.py" in ran[2]
    out_of, time_of = ran[3].split(" ", 2)[1:]
    assert out_of == f"OUT={tmp_path / 'logs'}" and 0 < int(time_of.split("=")[1]) < 110, ran[3]
    assert ran[4].startswith("unverified= -m bench --device cuda") and "--unverified" in ran[4]
    # the device tool brings back at most 8 files from $OUT: the logs travel as one archive
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu-session.tar.gz", "gpu.txt"]
    info = (out / "gpu.txt").read_text()
    assert all(f"step {s}: rc 0" in info for s in SESSION_STEPS), info
    with tarfile.open(out / "gpu-session.tar.gz") as archive:
        packed = {os.path.basename(name) for name in archive.getnames()}
    assert {"gpu.txt", "build.log", "pytest-gpu.log", "pytest-gpu-unverified.log", "bench.log"} <= packed, packed

    # a failed build ends the session; a session out of time skips what does not fit
    calls.unlink()
    proc = _session(tmp_path, BUILD_RC="1", **env)
    assert proc.returncode == 1 and [r.split()[2] for r in _steps_run(calls)] == ["pip"]
    calls.unlink()
    proc = _session(tmp_path, TOTAL="0", **env)
    assert proc.returncode == 0 and proc.stdout.count("skipped, 0 s left of 0") == 5 and _steps_run(calls) == []


# ---------------------------------------------------------------------------
# Allocator columns (CPU)
# ---------------------------------------------------------------------------
LDCONFIG = """\t2 libs found in cache `/etc/ld.so.cache'
\tlibtcmalloc_minimal_debug.so.4 (libc6,x86-64) => /lib/x86_64-linux-gnu/libtcmalloc_minimal_debug.so.4
\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => /lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
"""


def test_allocator_libraries_and_environment(tmp_path):
    assert allocator_columns.find_library("tcmalloc", LDCONFIG, dirs=()) == \
        "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    assert allocator_columns.find_library("jemalloc", LDCONFIG, dirs=()) is None
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert allocator_columns.find_library("jemalloc", "", dirs=(str(tmp_path),)) == str(tmp_path / "libjemalloc.so.2")
    absent = allocator_columns.plan(["warm", "default", "jemalloc"], True, {"jemalloc": None})
    assert absent["jemalloc"]["status"] == "absent" and "apt-get install libjemalloc2" in absent["jemalloc"]["reason"]
    assert allocator_columns.plan(["warm"], False)["warm"]["status"] == "absent"
    base = {"PATH": "/bin", "MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.malloc.x=1", "LD_PRELOAD": "/x.so"}
    assert allocator_columns.column_env("default", None, base) == {"PATH": "/bin", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    assert allocator_columns.column_env("jemalloc", "/j.so", base)["LD_PRELOAD"] == "/j.so"


def test_native_bfloat16_flags():
    from bench import env
    assert env.native_bfloat16("flags\t: fpu sse avx2 avx512f avx512_bf16\n") == (True, "CPU flags avx512_bf16")
    assert env.native_bfloat16("Features\t: fp asimd bf16\n")[0]
    native, why = env.native_bfloat16("flags\t: fpu avx2 fma\n")
    assert not native and "avx512_bf16" in why


def test_allocator_columns(tmp_path):
    """jemalloc and tcmalloc columns where a library is installed (each provider under LD_PRELOAD, in the table
    and the summary), left out with the reason where not."""
    cmd = [sys.executable, "-m", "bench", "--quick", "--only", "cbam", "--cases", "tiny/2x32x8x8/fwd/float32",
           "--providers", "fastattn-cpu,timm", "--allocator-cases", "all", "--compile-backend", "eager",
           "--threads", "1", "--no-memory", "--no-plots", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_bench_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    summary = next(tmp_path.glob("*.md")).read_text()
    (case,) = result["cases"]
    for column in ("jemalloc", "tcmalloc"):
        entry = result["allocators"]["columns"][column]
        if allocator_columns.find_library(column) is None:
            assert entry["status"] == "absent" and "apt-get install" in entry["reason"], entry
            assert f"{column} ms" not in proc.stdout and "not measured" in proc.stdout
            continue
        assert entry["status"] == "measured", entry
        for name in ("fastattn-cpu", "timm"):
            res = case["results"][name]["allocators"][column]
            assert res["status"] == "ok" and res["median_ms"] > 0, (column, name, res)
        assert column in case["ratios"]["fastattn-cpu"]["by_allocator"]
        assert f"{column} ms" in proc.stdout and f"| {column} |" in summary.replace(" | ", " |\n| ").replace("\n", " ")


def test_a_broken_allocator_column_is_a_failure_record():
    """A column whose allocator does not load (the dynamic loader only warns about a bad LD_PRELOAD) gives every
    provider a failure record instead of glibc figures under its name; a failed headline fails the provider."""
    case = next(c for c in cases.build("quick", ["cbam"], ["float32"], "cpu") if c.pass_ == "fwd")
    planned = {"jemalloc": {"status": "measured", "library": "/nonexistent/libjemalloc.so.2"}}
    with allocator_columns.Columns(planned, "eager", 1) as columns:
        measured = columns.measure(case, ["timm", INJECTED_FAILURE], warmup=0, repeats=1)
    for name in ("timm", INJECTED_FAILURE):
        res = measured["jemalloc"][name]
        assert res["status"] == "failed" and "wants jemalloc, but this process runs glibc" in res["error"], res

    from bench import run
    results = {"timm": {"status": "ok", "first_call_s": 0.1, "info": {}, "median_ms": 2.0, "min_ms": 1.0,
                        "times_ms": [2.0], "repeats": 1},
               "compile": {"status": "ok", "first_call_s": 0.1, "info": {}, "median_ms": 3.0, "min_ms": 3.0,
                           "times_ms": [3.0], "repeats": 1}}
    run.headline_from_columns(results, {"default": {
        "timm": {"status": "ok", "median_ms": 5.0, "min_ms": 4.0, "times_ms": [5.0], "repeats": 1},
        "compile": {"status": "failed", "stage": "allocator", "error": "the provider's process died: killed"}}},
        "warm")
    assert results["timm"]["median_ms"] == 5.0 and results["timm"]["allocators"]["warm"]["median_ms"] == 2.0
    assert results["compile"]["status"] == "failed" and results["compile"]["stage"] == "allocator"
    assert "default allocator column: the provider's process died" in results["compile"]["error"]
    assert results["compile"]["allocators"]["warm"]["median_ms"] == 3.0
    with pytest.raises(SystemExit):
        run.parse_args(["--allocators", "default,mimalloc"])
    assert run.parse_args(["--allocators", "none"]).allocators == []
