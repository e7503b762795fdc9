"""benchmarks/methods.py's verdict on a time ratio: the intervals decide, not the medians alone."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def methods():
    spec = importlib.util.spec_from_file_location("methods_benchmark", ROOT / "benchmarks" / "methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["methods_benchmark"] = module
    spec.loader.exec_module(module)
    return module


def band(low, median, high):
    return {"low": low, "median": median, "high": high}


@pytest.mark.parametrize("row, lora, verdict, low, high", [
    (band(0.10, 0.15, 0.20), band(0.90, 1.00, 1.10), "PASS", 0.10 / 1.10, 0.20 / 0.90),   # far end 0.222 ≤ 0.30
    (band(0.09, 0.19, 0.31), band(0.57, 0.62, 0.76), "OPEN", 0.09 / 0.76, 0.31 / 0.57),   # 0.118 … 0.544 straddle
    (band(0.40, 0.50, 0.60), band(0.90, 1.00, 1.10), "MISS", 0.40 / 1.10, 0.60 / 0.90),   # near end 0.364 > 0.30
    (band(0.00, 0.05, 0.10), band(-0.1, 0.50, 0.90), "OPEN", 0.0, math.inf),             # LoRA's interval reaches 0
])
def test_ratio_verdict_takes_the_far_and_near_ends_of_both_intervals(methods, row, lora, verdict, low, high):
    got = methods.ratio_verdict(row, lora, 0.30)
    assert got[0] == verdict
    assert got[1] == pytest.approx(low) and got[2] == pytest.approx(high)
