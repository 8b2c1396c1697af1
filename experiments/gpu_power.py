"""Sustained speed with the GPU's power draw and SM clock beside it. A short do_bench burst can run at a higher clock
than back-to-back calls do: an H100 SXM doing dense attention reaches its 700 W board limit and lowers its SM clock
(bench/results/attention_h100.md), and a 50-step denoising run is such a sustained load. So a kernel that needs less
energy per call is also the faster one there.

    with PowerSampler() as s:       # nvidia-smi samples every 50 ms in a child process
        ...                          # the GPU work
    s.summary()                      # {'power_w', 'sm_mhz', 'power_capped'} medians, {} without nvidia-smi
"""
from __future__ import annotations

import os
import statistics
import subprocess
import time

import torch

SW_POWER_CAP = 0x4  # nvidia-smi clocks_event_reasons bit: the driver lowers clocks to hold the power limit
QUERY = "power.draw,clocks.sm,clocks_event_reasons.active"


def _gpu_index() -> str:
    """nvidia-smi's index of the current device: CUDA_VISIBLE_DEVICES renumbers what torch sees."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    i = torch.cuda.current_device()
    return visible[i].strip() if i < len(visible) else str(i)


class PowerSampler:
    def __init__(self, interval_ms: int = 50):
        self.interval_ms = interval_ms
        self.lines: list[str] = []
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "PowerSampler":
        try:
            self._proc = subprocess.Popen(["nvidia-smi", "-i", _gpu_index(), f"--query-gpu={QUERY}",
                                           "--format=csv,noheader,nounits", f"-lms={self.interval_ms}"],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:  # no nvidia-smi: speed is still measured, power is not
            self._proc = None
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            out, _ = self._proc.communicate(timeout=10)
            self.lines = out.strip().splitlines()

    def summary(self) -> dict:
        rows = []
        for line in self.lines[1:]:  # the first sample may predate the load
            try:
                power, clock, reasons = (s.strip() for s in line.split(","))
                rows.append((float(power), float(clock), int(reasons, 16)))
            except ValueError:  # "[N/A]" or a line cut by terminate()
                continue
        if not rows:
            return {}
        return {"power_w": round(statistics.median(r[0] for r in rows)),
                "sm_mhz": round(statistics.median(r[1] for r in rows)),
                "power_capped": round(sum(bool(r[2] & SW_POWER_CAP) for r in rows) / len(rows), 2)}


def _run_for(fn, seconds: float) -> tuple[int, float]:
    """Call `fn` back to back for about `seconds`, two calls in flight at most (the CPU may not run ahead of the
    clock being sampled): (calls, elapsed seconds)."""
    pending: list[torch.cuda.Event] = []
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        pending.append(torch.cuda.Event())
        pending[-1].record()
        if len(pending) > 2:
            pending.pop(0).synchronize()
        calls += 1
    torch.cuda.synchronize()
    return calls, time.perf_counter() - start


def sustained(fn, seconds: float = 2.0) -> dict:
    """ms per call of `fn` run back to back for `seconds` after a warm-up second, with the median power draw and SM
    clock meanwhile."""
    _run_for(fn, 1.0)
    with PowerSampler() as sampler:
        calls, elapsed = _run_for(fn, seconds)
    return {"sustained_ms": round(1e3 * elapsed / calls, 4), **sampler.summary()}
