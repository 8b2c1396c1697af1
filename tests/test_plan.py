"""The memory planner: traced peaks, preference order, refusals naming a budget that really fits; and generation
under small budgets (streamed, chunked, tiled) on the CPU matching the unconstrained run."""
import dataclasses

import numpy as np
import pytest
import torch

import wanrt
from wanrt.runtime.config import get_variant
from wanrt.runtime import plan as planner
from wanrt.runtime.plan import WORKSPACE, Plan, PlanError, make_plan, plan_phase, trace_peak

LAT = (5, 8, 8)  # tiny: 17 frames at 64x64


def test_trace_peak_counts_live_tensors_and_ignores_views_of_inputs():
    w = torch.empty(1000, 1000, device="meta")  # 4 MB made before the trace: free to view

    def fn(w):
        a = w.t() * 2  # +4 MB (the transpose is a view of the input)
        b = a + 1  # +4 MB -> 8
        del a  # -> 4
        c = b @ b  # +4 MB -> 8
        return c

    assert trace_peak(fn, w) == 8_000_000


def test_attention_is_traced_as_a_fused_kernel():
    q = torch.empty(1, 2, 4096, 64, device="meta")
    out_bytes = q.numel() * 4
    lse_bytes = 2 * 4096 * 4
    assert trace_peak(torch.nn.functional.scaled_dot_product_attention, q, q, q) == out_bytes + lse_bytes


def test_plan_arithmetic_and_preferences():
    v = get_variant("t2v-1.3B")
    lat = (21, 60, 104)
    big = make_plan(v, lat, 4, 80 * 2**30)
    d = big.phase("denoise")
    assert not d.blocks.streamed and d.chunk is None and big.phase("decode").tile is None
    assert d.peak_bytes == d.fixed_bytes + d.activation_bytes + d.blocks.weight_bytes + WORKSPACE
    small = make_plan(v, lat, 4, 1 * 2**30)
    s = small.phase("denoise")
    assert s.blocks.streamed and s.blocks.slots >= 2 and s.peak_bytes <= 2**30
    assert small.phase("decode").tile is not None and small.peak_bytes <= 2**30
    assert s.activation_bytes < d.activation_bytes


def test_the_encoders_stream_their_blocks_even_when_all_would_fit():
    """umT5 and CLIP read each block once per generation: holding them all resident saves no copy and only raises the
    peak (umT5-XXL's blocks are 8.6 GiB in bf16), so they go through a ring of two slots, prompts together."""
    plan = make_plan(get_variant("i2v-14B"), (21, 60, 104), 40, 70 * 2**30)
    for name in ("text", "clip"):
        p = plan.phase(name)
        assert (p.blocks.resident, p.blocks.slots, p.chunk) == (0, 2, None)
    assert not plan.phase("denoise").blocks.streamed  # the DiT reads its blocks every step: resident when they fit
    assert plan.phase("text").peak_bytes < 2 * 2**30


def test_candidates_are_traced_only_when_reached(monkeypatch):
    """A roomy budget traces one candidate per phase (the first in preference order fits); a refusal, which names the
    smallest plan, traces every one, each once per shape whatever the steps and the budget."""
    traced = []

    def counted(fn, *args, **kwargs):
        traced.append(fn.__name__)
        return trace_peak(fn, *args, **kwargs)

    monkeypatch.setattr(planner, "trace_peak", counted)
    v, lat = get_variant("t2v-1.3B"), (3, 18, 20)  # a shape no other test plans: its traces are not cached yet
    make_plan(v, lat, 7, 70 * 2**30)
    assert [traced.count(n) for n in ("denoise", "forward", "decode", "run")] == [1, 1, 1, 0]
    traced.clear()
    with pytest.raises(PlanError):
        make_plan(v, lat, 9, 2**20)
    # the other (chunk, shared) of the DiT, the text encoder's one prompt at a time, a small tile and the whole frame
    assert [traced.count(n) for n in ("denoise", "forward", "decode", "run")] == [1, 2, 1, 1]


def test_refusal_names_a_budget_that_fits():
    v = get_variant("t2v-14B")
    with pytest.raises(PlanError, match="needs at least .* GiB .*--vram-budget") as err:
        make_plan(v, (21, 60, 104), 4, 1 * 2**30)
    plan = make_plan(v, (21, 60, 104), 4, err.value.needed)
    assert plan.peak_bytes <= err.value.needed


def smallest_plan(pipe, lat, steps):
    """Every phase at its own smallest plan: the most streaming, the smallest chunks and tiles."""
    phases = []
    names = ("text", "clip", "encode", "embed", "denoise", "decode") if pipe.variant.task == "i2v" else \
        ("text", "embed", "denoise", "decode")
    for name in names:
        with pytest.raises(PlanError) as err:
            plan_phase(name, pipe.variant, lat, steps, 1, pipe.dtype, pipe.vae_dtype)
        phases.append(plan_phase(name, pipe.variant, lat, steps, err.value.needed, pipe.dtype, pipe.vae_dtype))
    return Plan(max(p.peak_bytes for p in phases), tuple(phases))


def test_generation_with_the_smallest_plans_matches_the_unconstrained_one(checkpoints, monkeypatch):
    path = checkpoints["t2v", "official"]
    kw = dict(size="64*64", frame_num=17, sample_steps=3, base_seed=2, progress=False)
    full, lean = wanrt.load(path, device="cpu"), wanrt.load(path, device="cpu")
    plan = smallest_plan(lean, LAT, 3)
    assert all(plan.phase(n).blocks.streamed and plan.phase(n).blocks.resident == 0 for n in ("text", "denoise"))
    # Tiny frames are smaller than any planned chunk or tile: force small ones to run those paths too.
    phases = {p.name: p for p in plan.phases}
    phases["denoise"] = dataclasses.replace(phases["denoise"], chunk=7)
    plan = Plan(plan.budget, tuple(phases.values()))
    monkeypatch.setattr(lean, "plan", lambda *a, **k: plan)
    a, b = full.generate("a red circle", **kw).frames, lean.generate("a red circle", **kw).frames
    # Streaming changes nothing; token chunks only the rounding inside attention.
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1

    phases["decode"] = dataclasses.replace(phases["decode"], tile=(4, 6))  # 2 x 2 tiles of the 8 x 8 latents
    monkeypatch.setattr(lean, "plan", lambda *a, **k: Plan(plan.budget, tuple(phases.values())))
    c = lean.generate("a red circle", **kw).frames
    assert c.shape == a.shape and not np.array_equal(c, b)  # the tiled decode ran (its quality: test_vae_tiling)


def test_mmap_and_pinned_stores_generate_identical_frames(checkpoints):
    path = checkpoints["i2v", "diffusers"]
    image = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    from PIL import Image

    kw = dict(image=Image.fromarray(image), size="64*48", frame_num=5, sample_steps=2, base_seed=4, progress=False)
    ram = wanrt.load(path, device="cpu")
    mapped = wanrt.load(path, device="cpu", ram_budget=0)  # no RAM budget: every block stays memory-mapped
    img = kw["image"]
    assert "memory-mapped" in mapped.describe_plan("64*48", 5, 2, img) and "pinned RAM" in ram.describe_plan("64*48", 5, 2, img)
    assert np.array_equal(ram.generate("a cat", **kw).frames, mapped.generate("a cat", **kw).frames)


def test_an_out_of_memory_phase_is_replanned_once_and_gives_the_same_video(checkpoints, monkeypatch):
    path = checkpoints["t2v", "official"]
    kw = dict(size="32*32", frame_num=5, sample_steps=3, base_seed=9, progress=False)
    want = wanrt.load(path, device="cpu").generate("a red circle", **kw).frames
    pipe = wanrt.load(path, device="cpu", vram_budget=2**40)
    calls = {"n": 0}
    denoise = pipe.dit.denoise

    def flaky(*args, **kwargs):  # another process grabs memory in the middle of the second step, once
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("simulated")
        return denoise(*args, **kwargs)

    monkeypatch.setattr(pipe.dit, "denoise", flaky)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**32, 2**40))
    with pytest.warns(UserWarning, match="out of GPU memory in the denoise phase; retrying"):
        got = pipe.generate("a red circle", **kw).frames
    assert np.array_equal(got, want)

    monkeypatch.setattr(pipe.dit, "denoise", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="even after re-planning"):
        pipe.generate("a red circle", **kw)


def test_image_to_video_with_the_smallest_plans_matches_the_unconstrained_one(checkpoints, monkeypatch):
    from PIL import Image

    path = checkpoints["i2v", "official"]
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    kw = dict(image=image, size="64*48", frame_num=5, sample_steps=2, base_seed=5, progress=False)
    full, lean = wanrt.load(path, device="cpu"), wanrt.load(path, device="cpu")
    lat = lean.latent_shape("64*48", 5, np.zeros((3, 48, 64)))
    plan = smallest_plan(lean, lat, 2)
    assert plan.phase("clip").blocks.streamed and plan.phase("denoise").blocks.streamed
    monkeypatch.setattr(lean, "plan", lambda *a, **k: plan)
    a, b = full.generate("a cat", **kw).frames, lean.generate("a cat", **kw).frames
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
