"""The benchmarks' verdicts on a time ratio (issue 23): the intervals decide, not the medians alone; methods.py's
unpaired rule on two intervals and paired_ratio.py's test on the rounds' contrasts."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(stem: str):
    """``benchmarks/<stem>.py`` as a module (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{stem}_benchmark", ROOT / "benchmarks" / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def methods():
    return load_benchmark("methods")


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


@pytest.fixture(scope="module")
def paired():
    return load_benchmark("paired_ratio")


def test_paired_ratio_with_few_rounds_is_the_range_of_the_per_round_ratios(paired):
    # 8 rounds: at 95 % the interval of a median is the smallest to the largest value (coverage 1 - 2/2^8), so the
    # ratios the test keeps run from the smallest per-round ratio to the largest; worked by hand below.
    floor = [4.0, 4.4, 3.9, 4.2, 4.1, 4.6, 4.0, 4.3]
    lora = [4.6, 5.1, 4.5, 4.8, 4.7, 5.2, 4.6, 5.0]            # LoRA above the floor: .6 .7 .6 .6 .6 .6 .6 .7
    row = [4.12, 4.54, 4.02, 4.29, 4.19, 4.69, 4.15, 4.42]     # row above the floor:  .12 .14 .12 .09 .09 .09 .15 .12
    ratios = [(m - f) / (r - f) for m, r, f in zip(row, lora, floor)]     # .2 .2 .2 .15 .15 .15 .25 .171
    got = paired.paired_ratio(row, lora, floor, target=0.30)
    assert got["verdict"] == "PASS" and got["n"] == 8
    assert got["low"] == pytest.approx(min(ratios), abs=1.1e-3) and got["high"] == pytest.approx(max(ratios), abs=1.1e-3)
    d = sorted((m - f) - 0.30 * (r - f) for m, r, f in zip(row, lora, floor))
    assert got["contrast"]["low"] == pytest.approx(d[0]) and got["contrast"]["high"] == pytest.approx(d[-1])
    assert got["contrast"]["median"] == pytest.approx((d[3] + d[4]) / 2)
    # the ratio where the median contrast crosses 0: between the 4th and 5th smallest per-round ratio
    assert sorted(ratios)[3] - 1.1e-3 <= got["estimate"] <= sorted(ratios)[4] + 1.1e-3
    assert paired.paired_ratio(row, lora, floor, target=0.14)["verdict"] == "MISS"      # every round's ratio > 0.14
    assert paired.paired_ratio(row, lora, floor, target=0.20)["verdict"] == "OPEN"


def test_paired_ratio_sees_through_slow_rounds_that_widen_the_separate_intervals(paired, methods):
    # Every round stretched by its own factor (a slow spell falls on the whole round): own extra 0.25 s, LoRA's 1.0 s.
    stretch = [1.0, 1.3, 0.9, 1.5, 1.1, 1.25, 0.95, 1.4, 1.05, 1.35, 1.2, 0.85]
    floor = [4.0 * s for s in stretch]
    lora = [5.0 * s for s in stretch]
    row = [4.25 * s for s in stretch]
    got = paired.paired_ratio(row, lora, floor, target=0.30)
    assert got["verdict"] == "PASS"
    assert got["low"] == pytest.approx(0.25, abs=1.1e-3) and got["high"] == pytest.approx(0.25, abs=1.1e-3)
    from rowsft.evaluation.stats import median_interval
    row_band = median_interval([m - f for m, f in zip(row, floor)])
    lora_band = median_interval([r - f for r, f in zip(lora, floor)])
    assert methods.ratio_verdict(row_band, lora_band, 0.30)[0] == "OPEN"     # unpaired: 0.2375/1.35 … 0.3375/0.95 = 0.355


def test_paired_ratio_settles_nothing_with_too_few_rounds(paired):
    got = paired.paired_ratio([4.1, 4.2, 4.15], [5.0, 5.1, 5.0], [4.0, 4.1, 4.0])       # every round's ratio ≈ 0.1
    assert got["verdict"] == "OPEN" and got["contrast"]["coverage"] == pytest.approx(0.75)


def test_paired_ratio_refuses_rounds_of_unequal_number(paired):
    with pytest.raises(ValueError, match="equal numbers"):
        paired.paired_ratio([1.0, 2.0], [1.0], [1.0, 2.0])
