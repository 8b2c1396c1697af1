"""Step caching: which denoising steps run the DiT's blocks, and which add the residual (x_out - x_in over all blocks)
cached per branch from the last step that ran them (MagCache, TeaCache; shared/reference/feature-gaps.md section 3),
and where that residual is kept.

For Wan2.1 both decide from numbers known before any GPU work: MagCache from per-step magnitude ratios published per
model (or calibrated once for a model of our own), TeaCache from the time embeddings of the schedule's timesteps. So
the skip list is computed with the plan, printed by `--plan`, and a skipped step streams no weights. Each decision
loop is the reference's, call by call (conditional and unconditional branches interleaved).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache_constants import MAG_RATIOS, TEACACHE_COEFFICIENTS
from .dit import spans
from .options import parse_cache, parse_size

RETENTION = 0.2  # MagCache: the first 20% of calls always run the blocks (the references' retention_ratio)
TEACACHE_KEPT = 5  # TeaCache in its retention-steps mode: the first 5 steps always run
# The references' settings per variant: MagCache's README commands (1.3B E012K4, the 14B models E024K6); TeaCache's
# retention-steps thresholds of its README's slower (closer) setting.
MAGCACHE_DEFAULTS = {"t2v-1.3B": (0.12, 4)}
MAGCACHE_DEFAULT = (0.24, 6)
TEACACHE_DEFAULTS = {"t2v-1.3B": 0.05, "t2v-14B": 0.10}
TEACACHE_DEFAULT = 0.20
HOST_CHUNK = 4096  # tokens of a residual kept in host RAM that are on the GPU at once


@dataclass(frozen=True)
class StepSchedule:
    """runs[i][b]: whether step i runs the blocks for branch b (else it adds that branch's cached residual)."""
    method: str
    settings: str
    runs: tuple[tuple[bool, ...], ...]

    @property
    def computed(self) -> int:
        """DiT passes that run the blocks (a step with two branches counts two)."""
        return sum(map(sum, self.runs))

    @property
    def passes(self) -> int:
        return sum(map(len, self.runs))

    @property
    def step_map(self) -> str:
        """A character per step: R where a branch runs the blocks, . where every branch reuses its residual."""
        return "".join("R" if any(r) else "." for r in self.runs)

    def summary(self, ran: bool = True) -> str:
        """How many DiT passes run the blocks (after the run: ran) and how many reuse the cached residual."""
        runs, reuses = ("ran", "reused") if ran else ("run", "reuse")
        skipped = self.passes - self.computed
        return f"{self.computed} of {self.passes} DiT passes {runs} the blocks, {skipped} {reuses} the cached residual"

    def describe(self) -> str:
        return (f"step cache: {self.method} {self.settings}: {self.summary(ran=False)}\n"
                f"    steps (R runs, . reuses): {self.step_map}")


def constants_key(variant_name: str, size: str) -> str:
    """The published constants' name for a variant: the I2V-14B checkpoints differ by resolution (480P, 720P), told
    apart here by the size generated, as users pair them."""
    if variant_name != "i2v-14B":
        return variant_name
    w, h = parse_size(size)
    return "i2v-14B-720P" if w * h >= 1280 * 720 else "i2v-14B-480P"


def nearest_interp(values: list[float], n: int) -> list[float]:
    """The references' resampling of a per-step list to n steps (nearest index)."""
    if n == 1:
        return [values[-1]]
    scale = (len(values) - 1) / (n - 1)
    return [values[round(i * scale)] for i in range(n)]


def magcache_runs(ratios: list[float], steps: int, branches: int, thresh: float, k: int) -> list[tuple[bool, ...]]:
    """MagCache's decisions: `ratios` interleaved (cond, uncond) per step, resampled to `steps` per branch as the
    reference does when the counts differ. Per branch, after the first RETENTION of calls: multiply the ratios since
    the last computed call, add |1 - product| to the error, reuse while the error stays under `thresh` for at most
    `k` calls in a row. The first step always runs (for very few steps the reference would judge it too, with no
    residual yet to reuse)."""
    per_branch = [ratios[b::2] for b in range(2)][:branches]
    if len(per_branch[0]) != steps:
        per_branch = [nearest_interp(r, steps) for r in per_branch]
    ratio, err, skipped = [1.0] * branches, [0.0] * branches, [0] * branches
    runs = []
    for i in range(steps):
        step = []
        for b in range(branches):
            run = True
            if i > 0 and i * branches + b >= int(steps * branches * RETENTION):
                ratio[b] *= per_branch[b][i]
                skipped[b] += 1
                err[b] += abs(1 - ratio[b])
                run = not (err[b] < thresh and skipped[b] <= k)
                if run:
                    ratio[b], err[b], skipped[b] = 1.0, 0.0, 0
            step.append(run)
        runs.append(tuple(step))
    return runs


def teacache_runs(e0: torch.Tensor, coefficients: tuple[float, ...], thresh: float, branches: int) -> list[tuple]:
    """TeaCache's decisions (retention-steps mode) from the time projections e0 [steps, 6, dim] of the schedule:
    after the first TEACACHE_KEPT steps, add the rescaled relative L1 change of e0 since the previous step; reuse while
    the sum stays under `thresh`, then run and start again. The same for every branch (e0 does not depend on it)."""
    e0 = e0.double()
    acc, runs = 0.0, []
    for i in range(len(e0)):
        run = True
        if i >= TEACACHE_KEPT:
            change = float((e0[i] - e0[i - 1]).abs().mean() / e0[i - 1].abs().mean())
            acc += sum(c * change ** (len(coefficients) - 1 - p) for p, c in enumerate(coefficients))
            run = acc >= thresh
        if run:
            acc = 0.0
        runs.append((run,) * branches)
    return runs


def constants(method: str, variant, size: str) -> tuple[float, ...]:
    """MagCache's ratios (the model's calibration, else the published ones) or TeaCache's coefficients for this
    variant at this size; a variant with neither is refused, naming the way out."""
    key = constants_key(variant.name, size)
    if method == "magcache":
        ratios = variant.mag_ratios or MAG_RATIOS.get(key)
        if ratios is None:
            raise ValueError(f"magcache has no published ratios for {variant.name}: calibrate them once with "
                             f"`wanrt calibrate-cache --model DIR` (they are stored with the checkpoint)")
        return ratios
    coefficients = TEACACHE_COEFFICIENTS.get(key)
    if coefficients is None:
        raise ValueError(f"teacache has no published coefficients for {variant.name} (only "
                         f"{', '.join(TEACACHE_COEFFICIENTS)}); use magcache, whose ratios can be calibrated for any "
                         "model")
    return coefficients


def check_cache(spec: str | None, variant) -> None:
    """A cache spec this model can run, checked before any weight is read."""
    method = parse_cache(spec)[0]
    if method != "none":
        constants(method, variant, variant.sizes[0] if variant.sizes else "832*480")


def step_schedule(spec: str | None, variant, size: str, steps: int, branches: int, time_projection) -> \
        StepSchedule | None:
    """The schedule a cache spec ('magcache[:THRESH[:K]]', 'teacache[:THRESH]', 'none' or None) gives this run, or
    None for no caching. `time_projection()` returns e0 for the schedule (only TeaCache calls it)."""
    method, thresh, k = parse_cache(spec)
    if method == "none":
        return None
    values = constants(method, variant, size)
    if method == "magcache":
        d_thresh, d_k = MAGCACHE_DEFAULTS.get(variant.name, MAGCACHE_DEFAULT)
        thresh, k = thresh or d_thresh, k or d_k
        runs = magcache_runs(list(values), steps, branches, thresh, k)
        return StepSchedule("magcache", f"(threshold {thresh:g}, K {k})", tuple(runs))
    thresh = thresh or TEACACHE_DEFAULTS.get(variant.name, TEACACHE_DEFAULT)
    runs = teacache_runs(time_projection(), values, thresh, branches)
    return StepSchedule("teacache", f"(threshold {thresh:g})", tuple(runs))


def magnitude_ratio(residual: torch.Tensor, previous: torch.Tensor) -> float:
    """MagCache's calibration statistic: the mean over tokens of ||r_t|| / ||r_(t-1)|| (norms over channels)."""
    return float((residual.norm(dim=-1) / previous.norm(dim=-1)).mean())


class Residual:
    """One branch's cached residual: what the blocks added to its residual stream the last time they ran. Kept on the
    GPU, or where the plan says so (small budgets) in pinned host RAM, moved HOST_CHUNK tokens at a time: a skipped
    step then reads it once, a computed step writes x_in and then x_out - x_in."""

    def __init__(self, host: bool = False):
        self.host = host
        self.tensor: torch.Tensor | None = None

    def start(self, x: torch.Tensor) -> None:
        """Before the blocks run: keep x_in."""
        if self.tensor is None and self.host:
            self.tensor = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
        elif self.tensor is None:
            self.tensor = torch.empty_like(x)
        self.tensor.copy_(x)

    def finish(self, x: torch.Tensor) -> None:
        """After the blocks ran: x_in becomes x_out - x_in."""
        if not self.host:
            self.tensor.neg_().add_(x)
            return
        for s in spans(x.shape[1], HOST_CHUNK):
            self.tensor[:, s].copy_(x[:, s] - self.tensor[:, s].to(x.device, non_blocking=True))

    def add_to(self, x: torch.Tensor) -> torch.Tensor:
        """A skipped step: x_in + the cached residual, in place."""
        if self.tensor is None:
            raise ValueError("a step cache cannot reuse a residual before the blocks have run once")
        if not self.host:
            return x.add_(self.tensor)
        for s in spans(x.shape[1], HOST_CHUNK):
            x[:, s].add_(self.tensor[:, s].to(x.device, non_blocking=True))
        return x
