"""bench/convert_cases.py on its quick case, in process: both providers timed, memory read, convert's
report recorded, the table rendered."""
import os
import sys

import pytest

pytest.importorskip("mmcv")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import convert_cases  # noqa: E402
from bench.timing import Clock  # noqa: E402


def test_quick_case_record():
    (case,) = convert_cases.cases("quick")
    record = convert_cases.run_case(case, Clock(torch.device("cpu")), budget_s=0.0, min_repeats=2, max_repeats=2,
                                    measure_memory=True)
    assert record["replaced"] == {"NonLocal2d": 1} and record["left_alone"] == []
    for name in ("original", "fastattn"):
        result = record["results"][name]
        assert "error" not in result, result
        assert len(result["times_ms"]) == 2 and result["median_ms"] > 0 and result["peak_mem_mib"] >= 0
    assert record["speedup"] > 0
    assert "| mmcv | NonLocal2d | 2x16x8x8 | fwd+bwd |" in convert_cases.table([record])
    assert {c.label for c in convert_cases.cases("full")} > {c.label for c in convert_cases.cases("default")}
