"""Flow-matching sampling: the official Wan2.1 sigma grid, UniPC (bh2) and Euler solvers, CFG and the defaults.

Numerics follow the official `FlowUniPCMultistepScheduler` (Wan-Video/Wan2.1 `wan/utils/fm_solvers_unipc.py`), which
diffusers' `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)` reproduces. The model
predicts the velocity v, so the data prediction is x0 = x - sigma * v, and the noisy sample is x = (1 - sigma) x0 +
sigma * noise (alpha = 1 - sigma, lambda = log(alpha / sigma)).

Every solver coefficient is a Python float computed once from the float64 sigma grid, so `step` is only elementwise
tensor arithmetic: no host syncs, nothing depends on tensor values. The official code computes the same coefficients in
float32 at every step; the difference is float32 rounding (see tests/test_sampler.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .options import SOLVERS, parse_step_list

NUM_TRAIN_TIMESTEPS = 1000
# The official scheduler is built with shift 1 on a float32 training grid and takes sigma_max = sigmas[0].item(),
# so the grid starts at float32(0.999) = 0.9990000128746033, not at 0.999. At shift 1 that moves truncated timesteps
# (steps=3: 666, not 665).
SIGMA_MAX = float(torch.tensor(1 - 1 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32))

# `sample_neg_prompt`, wan/configs/shared_config.py, verbatim. Used when the negative prompt is empty.
DEFAULT_NEG_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走")
# wan/configs/wan_i2v_14B.py: `i2v_14B.sample_neg_prompt = "镜头晃动，" + ...` ("camera shake"); the I2V pipeline
# itself (image2video.py) adds nothing, it just reads its config's default.
I2V_NEG_PREFIX = "镜头晃动，"

TASKS = ("t2v", "t2i", "i2v", "flf2v")


def default_neg_prompt(task: str) -> str:
    """The official default negative prompt of a task ("t2v", "i2v", or an official name such as "i2v-14B")."""
    return I2V_NEG_PREFIX + DEFAULT_NEG_PROMPT if _task_kind(task) == "i2v" else DEFAULT_NEG_PROMPT


def default_shift(task: str, size: str | tuple[int, int]) -> float:
    """generate.py `_validate_args`: 5.0; 3.0 for I2V at 832*480 or 480*832; 16 for FLF2V.
    size: "W*H" or (W, H)."""
    kind = _task_kind(task)
    if not isinstance(size, str):
        size = "{}*{}".format(*size)
    if kind == "i2v" and size in ("832*480", "480*832"):
        return 3.0
    if kind == "flf2v":
        return 16.0
    return 5.0


def _task_kind(task: str) -> str:
    kind = task.split("-")[0]
    if kind not in TASKS:
        raise ValueError(f"task must be one of {TASKS} (optionally with a model suffix like '-14B'), got {task!r}")
    return kind


def cfg(cond: torch.Tensor, uncond: torch.Tensor, guide_scale: float) -> torch.Tensor:
    """Classifier-free guidance, as official: uncond + g * (cond - uncond)."""
    return uncond + guide_scale * (cond - uncond)


def flow_sigmas(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official grid (`FlowUniPCMultistepScheduler.set_timesteps(steps, shift=shift)`).

    sigma = linspace(SIGMA_MAX, 0, steps + 1)[:-1], shifted to s*sigma / (1 + (s-1)*sigma), then a final 0 appended.
    Returns sigmas [steps + 1] float64 (the official scheduler rounds these to float32) and timesteps [steps] int64 =
    trunc(shifted sigma * 1000) computed in float64, exactly what the official loop hands the DiT.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    # numpy, as official: its linspace (start + k * step) differs from torch's in the last ulp, which can move an
    # integer truncation.
    sigma = np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1]
    sigma = shift * sigma / (1 + (shift - 1) * sigma)
    timesteps = torch.from_numpy(sigma * NUM_TRAIN_TIMESTEPS).to(torch.int64)  # truncation toward zero, as official
    return torch.from_numpy(np.append(sigma, 0.0)), timesteps


def step_list_sigmas(step_list: tuple[float, ...], shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A step-distilled model's grid (LightX2V `WanStepDistillScheduler`): sigma = linspace(1, 0, 1001)[:-1] shifted
    as above and picked at index 1000 - t for each t of `step_list`; the timesteps handed to the DiT are the shifted
    sigmas * 1000, not truncated (1000, 750, 500, 250 at shift 5 -> 1000, 937.5, 833.3, 625). Returns sigmas
    [steps + 1] float64 (a final 0 appended) and timesteps [steps] float64."""
    step_list = parse_step_list(step_list)
    grid = np.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1]
    grid = shift * grid / (1 + (shift - 1) * grid)
    sigma = grid[[NUM_TRAIN_TIMESTEPS - int(t) for t in step_list]]
    return torch.from_numpy(np.append(sigma, 0.0)), torch.from_numpy(sigma * NUM_TRAIN_TIMESTEPS)


class FlowEuler:
    """x_next = x + (sigma_next - sigma) * v, i.e. x0 = x - sigma * v, then x0 + sigma_next * v (LightX2V's distilled
    step). Stateless; computes in x's dtype. On the official grid, or a step-distilled model's `step_list`."""

    def __init__(self, steps: int, shift: float, step_list: tuple[float, ...] | None = None):
        self.sigmas, self.timesteps = flow_sigmas(steps, shift) if step_list is None else \
            step_list_sigmas(step_list, shift)
        self.steps = len(self.timesteps)
        self._dt = (self.sigmas[1:] - self.sigmas[:-1]).tolist()

    def reset(self) -> None:
        pass

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        return x + self._dt[i] * v.to(x.dtype)


class FlowUniPC:
    """Order-2 UniPC, B(h) = expm1(-h) ("bh2"), data prediction, lower_order_final, corrector on every step after the
    first (the official `disable_corrector=[]`). `step(v, i, x)` must be called for i = 0, 1, ..., steps - 1.

    Step i, with m_i = x_i - sigma_i * v_i:
      1. UniC (i >= 1): x_i <- a * x_{i-1} + c * m_{i-1} [+ c' * m_{i-2}] + d * m_i, of the order the predictor of step
         i - 1 used. x_{i-1} is the (corrected) sample that predictor started from.
      2. UniP: x_{i+1} = a * x_i + c * m_i [+ c' * m_{i-1}], order min(2, i + 1, steps - i): 1 on the first step
         (warm-up) and the last (lower_order_final, whatever the step count; sigma_{i+1} = 0 there, so x_N = m_{N-1}).
    State: the last two x0 predictions and the sample the last predictor started from (three latents).
    """

    def __init__(self, steps: int, shift: float):
        self.sigmas, self.timesteps = flow_sigmas(steps, shift)
        self.steps = steps
        s = self._sig = self.sigmas.tolist()
        lam = [math.log(1 - sig) - math.log(sig) if sig > 0 else math.inf for sig in s]  # log(alpha / sigma)
        self.orders = [min(2, i + 1, steps - i) for i in range(steps)]
        # predictor i: coefficients of (x_i, m_i, m_{i-1}); corrector i: of (x_{i-1}, m_{i-1}, m_{i-2}, m_i)
        self._pred = [_unip(s, lam, i, p) for i, p in enumerate(self.orders)]
        self._corr = [None] + [_unic(s, lam, i, self.orders[i - 1]) for i in range(1, steps)]
        self.reset()

    def reset(self) -> None:
        self._m: list[torch.Tensor] = []  # x0 predictions, newest last (at most 2)
        self._last: torch.Tensor | None = None  # the sample the previous predictor started from
        self._next = 0

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """v: model velocity at (x, sigma_i); x: [B, C, F, H, W] latents (float32). Returns x at sigma_{i+1}, x.dtype."""
        assert i == self._next, f"FlowUniPC.step called with i={i}, expected {self._next} (call reset() to restart)"
        m = x - self._sig[i] * v.to(x.dtype)
        if i > 0:
            a, c0, c1, d = self._corr[i]
            x = a * self._last + c0 * self._m[-1] + d * m
            if c1:
                x = x + c1 * self._m[-2]
        self._m = [*self._m[-1:], m]
        self._last = x
        a, c0, c1 = self._pred[i]
        x_next = a * x + c0 * m
        if c1:
            x_next = x_next + c1 * self._m[-2]
        self._next = i + 1
        return x_next


def _phi(lam_t: float, lam_s: float) -> tuple[float, float, float]:
    """h = lambda_t - lambda_s; returns (h, hh = -h, expm1(-h)); with sigma_t = 0, h = inf and expm1(-h) = -1."""
    h = lam_t - lam_s
    return h, -h, math.expm1(-h)


def _unip(s: list[float], lam: list[float], i: int, order: int) -> tuple[float, float, float]:
    """UniP from sigma_i to sigma_{i+1}: x_{i+1} = a x_i + c0 m_i + c1 m_{i-1}."""
    sig_t, sig_s, alpha_t = s[i + 1], s[i], 1 - s[i + 1]
    if sig_t == 0:  # final step: lambda_t = inf; the official float math gives exactly x0 (order 1 only)
        assert order == 1
        return 0.0, 1.0, 0.0
    h, hh, phi1 = _phi(lam[i + 1], lam[i])
    a, c0, c1 = sig_t / sig_s, -alpha_t * phi1, 0.0
    if order == 2:  # D1 = (m_{i-1} - m_i) / rk, pred_res = 0.5 * D1 (the official shortcut for order 2), B_h = phi1
        rk = (lam[i - 1] - lam[i]) / h
        k = alpha_t * phi1 * 0.5 / rk
        c0, c1 = c0 + k, -k
    return a, c0, c1


def _unic(s: list[float], lam: list[float], i: int, order: int) -> tuple[float, float, float, float]:
    """UniC at sigma_i, correcting the step from sigma_{i-1}: x_i = a x_{i-1} + c0 m_{i-1} + c1 m_{i-2} + d m_i."""
    sig_t, sig_s, alpha_t = s[i], s[i - 1], 1 - s[i]
    h, hh, phi1 = _phi(lam[i], lam[i - 1])
    B = phi1  # bh2
    a, c0 = sig_t / sig_s, -alpha_t * phi1
    if order == 1:
        rho = [0.5]
        c1 = 0.0
    else:  # solve R rho = b with R = [[1, 1], [rk, 1]], b_k = h_phi_k * k! / B
        rk = (lam[i - 2] - lam[i - 1]) / h
        hphi1 = phi1 / hh - 1
        hphi2 = hphi1 / hh - 0.5
        b1, b2 = hphi1 / B, hphi2 * 2 / B
        rho = [(b1 - b2) / (1 - rk), (b2 - rk * b1) / (1 - rk)]
        # corr_res = rho_0 * (m_{i-2} - m_{i-1}) / rk
        c1 = -alpha_t * B * rho[0] / rk
        c0 -= c1
    d = -alpha_t * B * rho[-1]  # rho_last * D1_t, D1_t = m_i - m_{i-1}
    return a, c0 - d, c1, d


def make_solver(name: str, steps: int, shift: float,
                step_list: tuple[float, ...] | None = None) -> FlowUniPC | FlowEuler:
    """"unipc" (the official default) or "euler" (the only one that takes a step-distilled `step_list`). The
    official "dpm++" (FlowDPMSolverMultistepScheduler) is not implemented."""
    if step_list is not None and name != "euler":
        raise ValueError("denoising_step_list runs with sample_solver euler (a step-distilled model's sampler)")
    if name == "unipc":
        return FlowUniPC(steps, shift)
    if name == "euler":
        return FlowEuler(steps, shift, step_list)
    raise ValueError(f"sample_solver must be one of {SOLVERS}, got {name!r} (the official 'dpm++' is not implemented)")
