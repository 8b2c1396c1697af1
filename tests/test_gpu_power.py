"""bench/gpu_power.py's parsing of nvidia-smi samples, and the attention bench's sustained-load table (no GPU)."""
import random

from experiments.attention_bench import sustained_table
from experiments.gpu_power import PowerSampler


def sampler_with(lines):
    s = PowerSampler()
    s.lines = lines
    return s


def test_summary_takes_medians_and_the_capped_share():
    rng = random.Random()
    powers = [rng.uniform(600, 700) for _ in range(9)]
    clocks = [rng.choice([1515, 1590, 1650, 1980]) for _ in range(9)]
    capped = [rng.random() < 0.5 for _ in range(9)]
    lines = ["71.2, 345, 0x0000000000000001"]  # taken before the load: skipped
    lines += [f"{p:.2f}, {c}, 0x{(0x4 if k else 0x0):016x}" for p, c, k in zip(powers, clocks, capped)]
    got = sampler_with(lines).summary()
    assert got["power_w"] == round(sorted(powers)[4])
    assert got["sm_mhz"] == sorted(clocks)[4]
    assert got["power_capped"] == round(sum(capped) / 9, 2)


def test_summary_skips_unreadable_samples_and_is_empty_without_any():
    assert sampler_with(["x", "[N/A], 1500, 0x4", "650.0, 15"]).summary() == {}
    assert sampler_with([]).summary() == {}
    got = sampler_with(["x", "[N/A], 1500, 0x4", "650.0, 1600, 0x0000000000000004"]).summary()
    assert got == {"power_w": 650, "sm_mhz": 1600, "power_capped": 1.0}


def test_sustained_table_compares_with_cudnn_sdpa():
    base = {"variant": "sdpa_cudnn", "kernel_ms": 11.3, "sustained": {"sustained_ms": 12.0, "power_w": 699,
                                                                        "sm_mhz": 1530, "power_capped": 1.0}}
    ours = {"variant": "fp8", "kernel_ms": 8.2, "sustained": {"sustained_ms": 8.0}}  # no nvidia-smi: no power
    failed = {"variant": "sageattn", "error": "ModuleNotFoundError"}
    report = {"shapes": {"1.3B 480p self": {"rows": [base, ours, failed]}}}
    rows = [line for line in sustained_table(report) if line.startswith("| 1.3B")]
    assert rows == ["| 1.3B 480p self | sdpa_cudnn | 11.3 | 12.0 | 1.00 | 699 | 1530 | 1.0 |",
                    "| 1.3B 480p self | fp8 | 8.2 | 8.0 | 1.50 |  |  |  |"]
