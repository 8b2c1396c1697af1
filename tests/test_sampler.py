"""Sampler against the official formulas and diffusers' UniPCMultistepScheduler (the flow-matching UniPC that the
official FlowUniPCMultistepScheduler was converted from; same step code, configured the same way)."""
import math

import numpy as np
import pytest
import torch

from wanrt.runtime.sampler import (DEFAULT_NEG_PROMPT, I2V_NEG_PREFIX, FlowEuler, FlowUniPC, cfg, default_neg_prompt,
                                   default_shift, flow_sigmas, make_solver)

SHAPE = (1, 16, 3, 8, 12)  # [B, C, F, H, W]


def official_grid(steps, shift):
    """Transcription of `FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1).set_timesteps(steps,
    shift=shift)` (wan/utils/fm_solvers_unipc.py). Returns its float32 sigmas and int64 timesteps, plus the float64
    sigmas before the float32 cast."""
    alphas = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    train = torch.from_numpy(1.0 - alphas).to(dtype=torch.float32)
    train = 1 * train / (1 + (1 - 1) * train)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    sigmas64 = np.concatenate([sigmas, [0]])
    return torch.from_numpy(sigmas64.astype(np.float32)), torch.from_numpy(timesteps).to(torch.int64), sigmas64


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0, 12.0, 16.0])
def test_grid_matches_official(shift):
    for steps in range(1, 101):
        sig32, ts, sig64 = official_grid(steps, shift)
        sigmas, timesteps = flow_sigmas(steps, shift)
        assert sigmas.dtype == torch.float64 and sigmas.shape == (steps + 1,)
        assert timesteps.dtype == torch.int64 and timesteps.shape == (steps,)
        assert torch.equal(timesteps, ts), (steps, shift)
        assert torch.equal(sigmas, torch.from_numpy(sig64))
        assert torch.equal(sigmas.float(), sig32)


def test_grid_values():
    sigmas, timesteps = flow_sigmas(50, 5.0)
    assert timesteps[0] == 999 and timesteps[-1] == 92 and sigmas[-1] == 0
    s = 0.999 * 49 / 50  # the second sigma, by hand
    assert math.isclose(sigmas[1].item(), 5 * s / (1 + 4 * s), rel_tol=1e-7)
    # the official sigma_max is float32(0.999): at shift 1 it lands 999 * 2/3 on 666 (0.999 exactly gives 665)
    assert flow_sigmas(3, 1.0)[1].tolist() == [999, 666, 333]


def fake_model(x, sigma, i):
    """A deterministic velocity: nonlinear in x, different at every sigma and step."""
    return torch.tanh(1.5 * x) + 0.3 * torch.sin(2 * x + i) + sigma * torch.cos(x) - 0.2 * x


def diffusers_unipc(steps, shift):
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
    # set_timesteps(sigmas=) applies flow_shift itself: hand it the official unshifted grid (float64, as official).
    _, _, sig64 = official_grid(steps, 1.0)
    sched.set_timesteps(sigmas=sig64[:-1])
    sched.set_begin_index(0)
    return sched


def run(solver_step, timesteps, sigmas, x):
    xs = []
    for i in range(len(timesteps)):
        x = solver_step(fake_model(x, float(sigmas[i]), i), i, x)
        xs.append(x)
    return xs


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_step(sched):
    return lambda v, i, x: sched.step(v, sched.timesteps[i], x).prev_sample


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 50])
@pytest.mark.parametrize("shift", [3.0, 5.0])
def test_unipc_matches_diffusers(steps, shift):
    """Free-running trajectories, every step compared (relative to the reference's max |x|).

    float64: diffusers is handed our float64 sigmas, so both evaluate the same formulas in float64; this checks the
    algebra (measured <= 2.2e-15). float32: diffusers as configured, i.e. float32 sigmas and float32 coefficient math
    per step like the official code, against ours (float64 coefficients, float32 update). The gap is float32 rounding
    of the latents (measured <= 1.7e-6 at 50 steps, <= 5.1e-7 at <= 10): diffusers' own float32 run sits as far from the
    float64 trajectory as ours does."""
    pytest.importorskip("diffusers")
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    ours = FlowUniPC(steps, shift)
    ref = diffusers_unipc(steps, shift)
    # the same grid: diffusers rounds sigmas to float32 and truncates timesteps like the official code
    assert torch.equal(ref.timesteps, ours.timesteps)
    assert torch.equal(ref.sigmas, ours.sigmas.float())

    ref.sigmas = ours.sigmas.clone()
    a = run(ours.step, ours.timesteps, ours.sigmas, x0)
    b = run(diffusers_step(ref), ref.timesteps, ours.sigmas, x0)
    err64 = max(max_rel(p, q) for p, q in zip(a, b))

    ours.reset()
    ref = diffusers_unipc(steps, shift)
    a32 = run(ours.step, ours.timesteps, ours.sigmas, x0.float())
    b32 = run(diffusers_step(ref), ref.timesteps, ref.sigmas, x0.float())
    assert all(p.dtype == torch.float32 for p in a32)
    err32 = max(max_rel(p, q) for p, q in zip(a32, b32))
    ours_vs64 = max(max_rel(p.double(), q) for p, q in zip(a32, a))
    ref_vs64 = max(max_rel(p.double(), q) for p, q in zip(b32, a))
    print(f"steps={steps} shift={shift}: float64 {err64:.1e}; float32 vs diffusers {err32:.1e} "
          f"(final {max_rel(a32[-1], b32[-1]):.1e}); float32 vs float64 run: ours {ours_vs64:.1e}, "
          f"diffusers {ref_vs64:.1e}")
    assert err64 < 1e-12, err64
    assert err32 < (1e-6 if steps <= 10 else 4e-6), err32
    assert ours_vs64 < 2 * ref_vs64 + 1e-7, (ours_vs64, ref_vs64)


@pytest.mark.parametrize("steps", [4, 10, 50])
def test_unipc_single_steps_match_diffusers(steps):
    """Teacher-forced: both solvers get the same float32 (v_i, x_i) at every step, taken from a float64 run, so each
    step's error is measured alone (measured <= 9.5e-7)."""
    pytest.importorskip("diffusers")
    ours, ref, exact = FlowUniPC(steps, 5.0), diffusers_unipc(steps, 5.0), diffusers_unipc(steps, 5.0)
    exact.sigmas = ours.sigmas.clone()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i in range(steps):
        v = fake_model(x, ours._sig[i], i)
        a = ours.step(v.float(), i, x.float())
        b = ref.step(v.float(), ref.timesteps[i], x.float()).prev_sample
        assert max_rel(a, b) < 2e-6, (i, max_rel(a, b))
        x = exact.step(v, exact.timesteps[i], x).prev_sample


def test_unipc_orders_and_final_step():
    s = FlowUniPC(10, 5.0)
    assert s.orders == [1] + [2] * 8 + [1]  # warm-up, then order 2, lower_order_final on the last step only
    assert s._pred[-1] == (0.0, 1.0, 0.0)  # sigma 0: the result is the last x0 prediction
    x = torch.randn(SHAPE)
    for i in range(10):
        v = fake_model(x, s._sig[i], i)
        m = x - s._sig[i] * v
        x = s.step(v, i, x)
    assert torch.equal(x, m)
    with pytest.raises(AssertionError):
        s.step(v, 3, x)


def test_unipc_no_host_sync():
    """Meta tensors have no values: any .item(), .tolist() or data-dependent branch in step() would raise."""
    s = FlowUniPC(6, 5.0)
    x = torch.empty(SHAPE, device="meta")
    for i in range(6):
        x = s.step(torch.empty(SHAPE, device="meta"), i, x)
    assert x.shape == SHAPE and x.dtype == torch.float32


def test_euler():
    steps, shift = 4, 5.0
    sig = [0.9990000128746033 * (1 - k / steps) for k in range(steps)]
    sig = [shift * s / (1 + (shift - 1) * s) for s in sig] + [0.0]
    x = torch.randn(SHAPE, dtype=torch.float64)
    ref = x.clone()
    solver = make_solver("euler", steps, shift)
    assert isinstance(solver, FlowEuler)
    for i in range(steps):
        v = fake_model(x, sig[i], i)
        ref = ref + (sig[i + 1] - sig[i]) * v
        x = solver.step(v, i, x)
    torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12)


def test_make_solver():
    assert isinstance(make_solver("unipc", 5, 5.0), FlowUniPC)
    with pytest.raises(ValueError, match="unipc"):
        make_solver("dpm++", 5, 5.0)


def test_cfg():
    c, u = torch.randn(SHAPE), torch.randn(SHAPE)
    torch.testing.assert_close(cfg(c, u, 5.0), u + 5.0 * (c - u), rtol=0, atol=0)
    torch.testing.assert_close(cfg(c, u, 1.0), c)


def test_default_shift():
    assert default_shift("t2v", "832*480") == 5.0
    assert default_shift("t2v-1.3B", (480, 832)) == 5.0
    assert default_shift("i2v", "1280*720") == 5.0
    assert default_shift("i2v", "832*480") == 3.0
    assert default_shift("i2v-14B", (480, 832)) == 3.0
    assert default_shift("flf2v-14B", "1280*720") == 16.0
    with pytest.raises(ValueError, match="t2v"):
        default_shift("v2v", "832*480")


def test_neg_prompt():
    assert DEFAULT_NEG_PROMPT.startswith("色调艳丽，过曝，静态，") and DEFAULT_NEG_PROMPT.endswith("背景人很多，倒着走")
    assert DEFAULT_NEG_PROMPT.count("，") == 27 and len(DEFAULT_NEG_PROMPT) == 137
    assert default_neg_prompt("t2v") == DEFAULT_NEG_PROMPT
    assert default_neg_prompt("i2v-14B") == I2V_NEG_PREFIX + DEFAULT_NEG_PROMPT == "镜头晃动，" + DEFAULT_NEG_PROMPT


def test_the_distill4_schedule_is_lightx2vs():
    """LightX2V's WanStepDistillScheduler: sigmas linspace(1, 0, 1001)[:-1], shifted by 5, picked at 1000 - t for
    t in [1000, 750, 500, 250]; the DiT gets sigma * 1000, untruncated; each step x0 + sigma_next * v."""
    from wanrt.runtime.options import PRESETS
    from wanrt.runtime.sampler import FlowEuler

    p = PRESETS["distill4"]
    solver = FlowEuler(p["sample_steps"], p["sample_shift"], p["denoising_step_list"])
    want = torch.tensor([1000.0, 937.5, 2500 / 3, 625.0], dtype=torch.float64)
    assert torch.allclose(solver.timesteps, want, rtol=0, atol=1e-6)
    assert solver.sigmas.tolist()[-1] == 0.0 and solver.steps == 4
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    s = solver.sigmas
    for i in range(4):
        x0 = x - s[i].item() * v
        assert torch.allclose(solver.step(v, i, x), x0 + s[i + 1].item() * v, atol=1e-6)
    with pytest.raises(ValueError, match="decreasing timesteps"):
        FlowEuler(4, 5.0, (250, 500))
