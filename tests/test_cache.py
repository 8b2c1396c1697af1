"""Step caching (MagCache, TeaCache): the schedules against the references' decision loops, the cached residual path,
the plan, engines, calibration and bad input."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

import wanrt
from wanrt.cli import main
from wanrt.export.engine import export_engine
from wanrt.runtime import cache
from wanrt.runtime.cache import RETENTION, TEACACHE_KEPT, Residual, constants_key, magcache_runs, teacache_runs
from wanrt.runtime.cache_constants import MAG_RATIOS, TEACACHE_COEFFICIENTS
from wanrt.runtime.checkpoint import CheckpointError, open_checkpoint
from wanrt.runtime.config import get_variant
from wanrt.runtime.dit import WanDiT
from wanrt.runtime.engine import open_engine
from wanrt.runtime.plan import GiB, PlanError, make_plan
from wanrt.runtime.sampler import make_solver

from test_plan import smallest_plan

PROMPT = "a red circle moves right on a blue background"
KW = dict(size="32*32", frame_num=5, sample_steps=6, base_seed=3, progress=False)


def reference_magcache(mag_ratios, steps, thresh, k, retention=0.2):
    """MagCache4Wan2.1's magcache_forward, call by call (cond, uncond interleaved), with its nearest_interp."""
    mag_ratios = np.array(mag_ratios)
    if len(mag_ratios) != steps * 2:
        def nearest_interp(src, n):
            return np.array([src[-1]]) if n == 1 else src[np.round(np.arange(n) * (len(src) - 1) / (n - 1)).astype(int)]
        mag_ratios = np.concatenate([nearest_interp(mag_ratios[0::2], steps).reshape(-1, 1),
                                     nearest_interp(mag_ratios[1::2], steps).reshape(-1, 1)], axis=1).reshape(-1)
    num_steps, ratio, err, skipped, calls = steps * 2, [1.0, 1.0], [0.0, 0.0], [0, 0], []
    for cnt in range(num_steps):
        skip = False
        if cnt >= int(num_steps * retention):
            ratio[cnt % 2] *= mag_ratios[cnt]
            skipped[cnt % 2] += 1
            err[cnt % 2] += np.abs(1 - ratio[cnt % 2])
            if err[cnt % 2] < thresh and skipped[cnt % 2] <= k:
                skip = True
            else:
                err[cnt % 2], skipped[cnt % 2], ratio[cnt % 2] = 0, 0, 1.0
        calls.append(not skip)
    return [tuple(calls[2 * i : 2 * i + 2]) for i in range(steps)]


@pytest.mark.parametrize("key,steps,thresh,k,computed", [
    ("t2v-1.3B", 50, 0.12, 2, 25), ("t2v-1.3B", 50, 0.12, 4, 21), ("t2v-14B", 50, 0.12, 4, 21),
    ("t2v-14B", 50, 0.24, 6, 18), ("i2v-14B-480P", 40, 0.24, 6, 15), ("i2v-14B-720P", 40, 0.24, 6, 14),
    ("t2v-1.3B", 20, 0.12, 4, None), ("t2v-14B", 30, 0.24, 6, None), ("i2v-14B-480P", 50, 0.12, 2, None)])
def test_magcache_schedule_is_the_reference_decision_loop(key, steps, thresh, k, computed):
    ours = magcache_runs(list(MAG_RATIOS[key]), steps, 2, thresh, k)
    assert ours == reference_magcache(MAG_RATIOS[key], steps, thresh, k)
    if computed is not None:  # the references' published counts of steps computed
        assert sum(any(r) for r in ours) == computed
    assert all(ours[i] == (True, True) for i in range(int(steps * RETENTION)))
    one = magcache_runs(list(MAG_RATIOS[key]), steps, 1, thresh, k)  # guidance 1: the conditional ratios alone
    assert [r[0] for r in one][int(steps * RETENTION):] == [r[0] for r in ours][int(steps * RETENTION):]


@pytest.mark.parametrize("steps,branches", [(1, 2), (2, 2), (4, 1), (3, 1)])
def test_very_few_steps_run_the_first_one(steps, branches):
    runs = magcache_runs(list(MAG_RATIOS["t2v-1.3B"]), steps, branches, 0.5, 6)
    assert runs[0] == (True,) * branches and len(runs) == steps


def reference_teacache(e0s, coefficients, thresh, steps):
    """TeaCache4Wan2.1's teacache_forward for the conditional calls, retention-steps mode (ret_steps 5*2, cutoff
    sample_steps*2)."""
    rescale, acc, previous, calls = np.poly1d(coefficients), 0.0, None, []
    for cnt in range(0, steps * 2, 2):
        if cnt < TEACACHE_KEPT * 2 or cnt >= steps * 2:
            calc, acc = True, 0
        else:
            acc += rescale(((e0s[cnt // 2] - previous).abs().mean() / previous.abs().mean()).item())
            calc = not acc < thresh
            if calc:
                acc = 0
        previous = e0s[cnt // 2].clone()
        calls.append(calc)
    return calls


@pytest.mark.parametrize("thresh", [0.05, 0.1, 0.2, 0.3])
def test_teacache_schedule_is_the_reference_decision_loop(checkpoints, thresh):
    dit = wanrt.load(checkpoints["t2v", "official"], device="cpu").dit
    for steps in (20, 50):
        e0 = dit.embed_time(make_solver("unipc", steps, 5.0).timesteps.float())[1].detach().double()
        for coefficients in TEACACHE_COEFFICIENTS.values():
            ours = teacache_runs(e0, coefficients, thresh, 2)
            assert [r[0] for r in ours] == reference_teacache(e0, coefficients, thresh, steps)
            assert all(r[0] == r[1] for r in ours)


@pytest.mark.parametrize("host", [False, True])
def test_a_skipped_step_adds_the_cached_residual_and_fetches_no_block(checkpoints, monkeypatch, host):
    """Kept on the device or in host RAM (moved in chunks of 5 of the 8 tokens here; pinned, on a GPU): the same
    numbers."""
    monkeypatch.setattr(cache, "HOST_CHUNK", 5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = open_checkpoint(checkpoints["t2v", "official"])
    dit = WanDiT(ckpt.variant.dit)
    dit.load_state_dict(ckpt.dit_state())
    dit.to(dev)
    cfg = dit.cfg
    g = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(2, 1, cfg.in_dim, 2, 4, 4, generator=g).to(dev)
    ctx = [dit.embed_context(torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(dev)) for _ in range(2)]
    t = dit.embed_time(torch.tensor([700.0], device=dev))
    plain = dit.denoise(x, t, ctx)
    residuals = [Residual(host), Residual(host)]
    computed = dit.denoise(x, t, ctx, runs=(True, True), residuals=residuals)
    assert all(torch.equal(a, b) for a, b in zip(plain, computed))  # caching never changes a step that runs

    def no_blocks(i):
        raise AssertionError("a skipped step fetched a block")

    skipped = dit.denoise(x, t, ctx, no_blocks, runs=(False, False), residuals=residuals)
    for a, b in zip(skipped, plain):  # x_in + (x_out - x_in): the computed output up to fp32 rounding
        assert float((a - b).abs().max() / b.abs().max()) < 1e-5
    moved = dit.denoise(x2, t, ctx, no_blocks, runs=(False, False), residuals=residuals)
    assert not torch.allclose(moved[0], skipped[0])
    one = dit.denoise(x, t, ctx, runs=(True, False), residuals=residuals)  # branches decide on their own
    assert torch.equal(one[0], plain[0])
    with pytest.raises(ValueError, match="needs their cached residuals"):
        dit.denoise(x, t, ctx, runs=(False, True))
    with pytest.raises(ValueError, match="before the blocks have run once"):
        dit.denoise(x, t, ctx, runs=(True, False), residuals=[Residual(host), Residual(host)])
    if host:  # the same steps with the residuals on the device give the same numbers
        kept = [Residual(), Residual()]
        dit.denoise(x, t, ctx, runs=(True, True), residuals=kept)
        again = dit.denoise(x2, t, ctx, no_blocks, runs=(False, False), residuals=kept)
        assert all(torch.equal(a, b) for a, b in zip(again, moved))


def test_small_budgets_keep_the_cached_residuals_in_host_ram():
    """14B 832*480 x 81: the residuals (1.34 GB for both branches) on the GPU while they fit; under 4 GiB they wait in
    host RAM rather than serialise the block copies through one slot, and a cached run fits any budget an uncached
    one fits plus two chunks in transit."""
    v, lat = get_variant("t2v-14B"), (21, 60, 104)
    roomy = make_plan(v, lat, 50, 8 * GiB, cached=True).phase("denoise")
    tight = make_plan(v, lat, 50, 4 * GiB, cached=True).phase("denoise")
    bare = make_plan(v, lat, 50, 4 * GiB).phase("denoise")
    assert not roomy.host_residuals and tight.host_residuals and tight.blocks.slots >= 2
    assert "cached residuals in pinned host RAM" in tight.describe()
    assert (tight.chunk, tight.blocks, tight.shared) == (bare.chunk, bare.blocks, bare.shared)
    transit = 2 * cache.HOST_CHUNK * v.dit.dim * 4
    assert tight.fixed_bytes - bare.fixed_bytes == transit
    needed = []
    for cached in (False, True):
        with pytest.raises(PlanError) as err:
            make_plan(v, lat, 50, 1 * GiB, cached=cached)
        needed.append(err.value.needed)
    assert needed[1] - needed[0] <= transit * 16 / 15 + 1  # in budget terms (plan.usable keeps 1/16 free)


@pytest.fixture(scope="module")
def calibrated(checkpoints, tmp_path_factory):
    """A copy of the tiny T2V checkpoint with its MagCache ratios calibrated by `wanrt calibrate-cache`."""
    root = tmp_path_factory.mktemp("calibrated") / "ckpt"
    shutil.copytree(checkpoints["t2v", "official"], root)
    assert main(["calibrate-cache", "--model", str(root), "--device", "cpu", "--size", "32*32", "--frame_num", "5",
                 "--sample_steps", "10"]) == 0
    return root


def test_calibration_is_stored_with_the_checkpoint_and_engines_record_it(calibrated, tmp_path, capsys):
    record = json.loads((calibrated / "magcache.json").read_text())
    assert len(record["ratios"]) == 20 and record["ratios"][:2] == [1.0, 1.0] and record["steps"] == 10
    assert all(0.1 < r < 10 for r in record["ratios"])
    assert open_checkpoint(calibrated).variant.mag_ratios == tuple(record["ratios"])
    engine = export_engine(calibrated, tmp_path / "e", progress=False, cache="magcache:0.3:3")
    assert open_engine(engine).variant.mag_ratios == tuple(record["ratios"])
    pipe = wanrt.load(engine, device="cpu")
    assert pipe.cache == "magcache:0.3:3"
    assert "magcache (threshold 0.3, K 3)" in pipe.describe_plan(size="32*32", frame_num=5, sample_steps=12)
    assert wanrt.load(engine, device="cpu", cache="none").describe_plan(size="32*32").find("step cache") == -1
    assert main(["calibrate-cache", "--model", str(calibrated), "--device", "cpu"]) == 2
    assert main(["calibrate-cache", "--model", str(engine), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite" in err and "calibrate the checkpoint, then export it" in err


def test_few_step_runs_ignore_a_recorded_cache_and_warn_when_one_is_asked_for(calibrated, tmp_path):
    engine = export_engine(calibrated, tmp_path / "e", progress=False, cache="magcache")
    recorded, asked = wanrt.load(engine, device="cpu"), wanrt.load(engine, device="cpu", cache="magcache")
    for steps in (12, 6):
        assert ("step cache" in recorded.describe_plan(size="32*32", sample_steps=steps)) == (steps == 12)
    for request in (dict(sample_steps=6), dict(preset="distill4", sample_steps=None)):
        recorded.generate(PROMPT, **dict(KW, **request))
        assert recorded.step_schedule is None
        with pytest.warns(UserWarning, match=r"magcache on a [46]-step run computes \d+ of \d+ DiT passes"):
            asked.generate(PROMPT, **dict(KW, **request))
        assert asked.step_schedule is not None


def test_cached_generation_plans_the_residuals_and_reports_the_passes(calibrated, capsys):
    plain, cached = wanrt.load(calibrated, device="cpu"), wanrt.load(calibrated, device="cpu", cache="magcache:0.5:2")
    a = plain.generate(PROMPT, **KW).frames
    b = cached.generate(PROMPT, **dict(KW, progress=True)).frames
    schedule = cached.step_schedule
    assert schedule.runs[0] == (True, True) and schedule.computed < schedule.passes
    assert f"denoise: {schedule.computed} of 12 DiT passes ran the blocks" in capsys.readouterr().out
    assert not np.array_equal(a, b) and np.abs(a.astype(int) - b.astype(int)).mean() < 20
    lat = cached.latent_shape("32*32", 5)
    bare, kept = (p.plan(lat, 6, cached=c).phase("denoise") for p, c in ((plain, False), (cached, True)))
    cfg = cached.variant.dit
    assert kept.fixed_bytes - bare.fixed_bytes == 2 * lat[0] * lat[1] * lat[2] // 4 * cfg.dim * 4


@pytest.mark.parametrize("shared,host", [(False, False), (True, False), (True, True)])
def test_caching_with_streamed_blocks_and_token_chunks_matches_resident(calibrated, monkeypatch, shared, host):
    """Blocks streamed through one slot, tokens in chunks, the branches one after the other or sharing each block,
    the cached residuals on the device or in host RAM."""
    monkeypatch.setattr(cache, "HOST_CHUNK", 40)
    kw = dict(size="64*64", frame_num=17, sample_steps=6, base_seed=2, progress=False)
    full = wanrt.load(calibrated, device="cpu", cache="magcache:0.5:2")
    lean = wanrt.load(calibrated, device="cpu", cache="magcache:0.5:2")
    plan = smallest_plan(lean, full.latent_shape("64*64", 17), 6)
    phases = {p.name: p for p in plan.phases}
    phases["denoise"] = dataclasses.replace(phases["denoise"], chunk=32, shared=shared, host_residuals=host)
    assert phases["denoise"].blocks.streamed
    monkeypatch.setattr(lean, "plan", lambda *a, **k: dataclasses.replace(plan, phases=tuple(phases.values())))
    a, b = full.generate(PROMPT, **kw).frames, lean.generate(PROMPT, **kw).frames
    assert full.step_schedule == lean.step_schedule and full.step_schedule.computed < 12
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # token chunks change only attention's rounding


def test_teacache_on_a_named_variant_and_guidance_1(checkpoints):
    pipe = wanrt.load(checkpoints["t2v", "official"], device="cpu")
    pipe.variant = dataclasses.replace(pipe.variant, name="t2v-1.3B")  # borrow 1.3B's coefficients
    pipe.cache = "teacache:0.3"
    pipe.generate(PROMPT, **dict(KW, sample_steps=12, sample_guide_scale=1.0))
    schedule = pipe.step_schedule
    assert schedule.passes == 12 and schedule.runs[:TEACACHE_KEPT] == ((True,),) * TEACACHE_KEPT


def test_image_to_video_with_a_calibrated_cache(checkpoints, tmp_path):
    from PIL import Image

    root = tmp_path / "i2v"
    shutil.copytree(checkpoints["i2v", "official"], root)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    pipe = wanrt.load(root, device="cpu")
    ratios = pipe.calibrate_cache(PROMPT, image=image, **dict(KW, progress=False))
    (root / "magcache.json").write_text(json.dumps({"ratios": ratios}))
    cached = wanrt.load(root, device="cpu", cache="magcache:0.5:2")
    cached.generate(PROMPT, image=image, **KW)
    assert cached.step_schedule.computed < cached.step_schedule.passes


@pytest.mark.parametrize("flags,message", [
    (["--cache", "fastcache"], "cache must be one of none, magcache, teacache"),
    (["--cache", "magcache:1.5"], "threshold must be a finite number in (0, 1]"),
    (["--cache", "magcache:0.1:0"], "K (most steps reused in a row) must be an integer"),
    (["--cache", "teacache:0.1:2"], "cache must be none, magcache[:THRESH[:K]] or teacache[:THRESH]"),
    (["--cache", "teacache"], "teacache has no published coefficients for demo-t2v"),
])
def test_bad_cache_options_are_one_line(tmp_path, capsys, flags, message):
    assert main(["generate", "--prompt", PROMPT, "--device", "cpu", "--out", str(tmp_path / "v.mp4"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wanrt: error: ") and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "v.mp4").exists()


def test_a_model_without_constants_or_calibration_is_refused(checkpoints, tmp_path, capsys):
    assert main(["generate", "--model", str(checkpoints["t2v", "official"]), "--prompt", PROMPT, "--cache",
                 "magcache", "--device", "cpu", "--out", str(tmp_path / "v.mp4")]) == 2
    assert "magcache has no published ratios for tiny-t2v: calibrate them once" in capsys.readouterr().err
    with pytest.raises(ValueError, match="teacache has no published coefficients for tiny-t2v"):
        wanrt.load(checkpoints["t2v", "official"], device="cpu", cache="teacache")  # before any weight is read
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["t2v", "official"], bad)
    (bad / "magcache.json").write_text(json.dumps({"ratios": [1.0, "x"]}))
    with pytest.raises(CheckpointError, match="'ratios' must be an even-length list of positive numbers"):
        open_checkpoint(bad)


def test_the_demo_model_plan_shows_its_cache_schedule(capsys):
    assert main(["generate", "--prompt", PROMPT, "--device", "cpu", "--cache", "magcache", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "step cache: magcache (threshold 0.24, K 6): 16 of 40 DiT passes run the blocks" in out
    assert "steps (R runs, . reuses): RRRR....R...R..R..R." in out


def test_the_i2v_constants_follow_the_size_generated():
    assert constants_key("i2v-14B", "1280*720") == "i2v-14B-720P" == constants_key("i2v-14B", "720*1280")
    assert constants_key("i2v-14B", "832*480") == "i2v-14B-480P" and constants_key("t2v-14B", "1280*720") == "t2v-14B"


def test_caching_with_a_quantized_scheme(calibrated):
    plain = wanrt.load(calibrated, device="cpu", scheme="int8").generate(PROMPT, **KW).frames
    pipe = wanrt.load(calibrated, device="cpu", scheme="int8", cache="magcache:0.5:2")
    cached = pipe.generate(PROMPT, **KW).frames
    assert pipe.step_schedule.computed < pipe.step_schedule.passes
    assert not np.array_equal(plain, cached) and np.abs(plain.astype(int) - cached.astype(int)).mean() < 20
