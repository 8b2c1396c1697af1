"""RunOptions: one set of names for the CLI, wanrt.load and engines; validation, capability checks, engine round
trips, guidance 1 as one DiT pass, and CFG branches sharing each streamed block."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import wanrt
from wanrt.cli import build_parser, main
from wanrt.export.engine import export_engine
from wanrt.quant.formats import SCHEMES as QUANT_SCHEMES
from wanrt.runtime import options as O
from wanrt.runtime.engine import MANIFEST, open_engine
from wanrt.runtime.pipeline import resolve_options
from wanrt.runtime.plan import Plan

PROMPT = "a red circle moves right on a blue background"
KW = dict(size="32*32", frame_num=5, sample_steps=3, base_seed=4, progress=False)


def test_the_option_names_agree_everywhere():
    assert set(O.SCHEMES) == set(QUANT_SCHEMES)
    from wanrt.kernels.attention import MODES

    assert set(O.ATTENTION_MODES) - {"auto"} <= set(MODES)
    help_text = {name: " ".join(build_parser()._subparsers._group_actions[0].choices[name].format_help().split())
                 for name in ("generate", "export", "bench")}
    for flag in ("--attention", "--scheme", "--text-scheme"):
        assert all(flag in text for text in help_text.values()), flag
    assert "default: the engine's, else auto" in help_text["generate"]


@pytest.mark.parametrize("kwargs,message", [
    ({"attention": "flash"}, "attention must be one of auto, sdpa, fp8, int8, int8_fp8pv"),
    ({"scheme": "nf3"}, "scheme must be one of"), ({"text_scheme": "w8a16"}, "text_scheme must be one of"),
    ({"vram_budget": "4 parsecs"}, "expected a size like 4GiB"), ({"ram_budget": -1}, "ram_budget must be")])
def test_bad_options_are_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        O.RunOptions(**kwargs)
    with pytest.raises(ValueError, match=message):
        wanrt.load(device="cpu", **kwargs)


def test_budgets_take_sizes_in_python_as_on_the_cli():
    pipe = wanrt.load(device="cpu", vram_budget="1.5GiB", ram_budget="512MiB")
    assert (pipe.vram_budget, pipe.ram_budget) == (3 * 2**29, 2**29)


@pytest.fixture
def fake_gpu(monkeypatch):
    """resolve_options on a 'cuda' device of the given capability, without a GPU."""
    def on(cap, triton=True):
        import wanrt.quant.formats as F
        import wanrt.runtime.pipeline as P

        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        monkeypatch.setattr(P, "has_triton", lambda: triton)
        monkeypatch.setattr(F, "has_triton", lambda: triton)
        return torch.device("cuda")
    return on


def test_auto_attention_is_the_measured_mode_per_gpu(checkpoints, fake_gpu):
    src = wanrt.runtime.pipeline.open_source(checkpoints["t2v", "official"])
    run = lambda cap, **kw: resolve_options(src, O.RunOptions(**kw), fake_gpu(cap)).dit.attention
    assert run((9, 0)) == "int8_fp8pv"  # measured on the H100
    assert run((8, 9)) == "sdpa" and run((8, 0)) == "sdpa"  # never measured: SDPA
    assert resolve_options(src, O.RunOptions(), fake_gpu((9, 0), triton=False)).dit.attention == "sdpa"
    assert run((8, 0), attention="int8") == "int8"
    with pytest.raises(ValueError, match="attention mode 'fp8' needs a GPU of compute capability >= 8.9"):
        run((8, 0), attention="fp8")
    with pytest.warns(RuntimeWarning, match="Falling back to 'w8a16'"):  # fp8 GEMMs on an A100: the stated fallback
        assert resolve_options(src, O.RunOptions(scheme="fp8"), fake_gpu((8, 0))).dit.quant == "w8a16"


@pytest.fixture(scope="module")
def engine(checkpoints, tmp_path_factory):
    return export_engine(checkpoints["t2v", "official"], tmp_path_factory.mktemp("e") / "engine", "int8",
                         progress=False, text_scheme="int8", attention="int8")


def test_an_engine_records_its_options_and_runs_with_them(engine):
    m = json.loads((engine / MANIFEST).read_text())
    assert m["options"] == {"attention": "int8", "scheme": "int8", "text_scheme": "int8", "cache": None}
    assert m["schemes"]["text_blocks"] == "int8"
    from safetensors import safe_open

    with safe_open(engine / "text" / "block_00.safetensors", "pt") as f:
        assert f.get_tensor("attn.q.weight").dtype == torch.int8 and "attn.q.weight_scale" in f.keys()
    pipe = wanrt.load(engine, device="cpu")
    assert (pipe.variant.dit.attention, pipe.variant.dit.quant, pipe.variant.text.quant) == ("int8", "int8", "int8")
    assert pipe.generate(PROMPT, **KW).frames.shape == (5, 32, 32, 3)
    assert wanrt.load(engine, device="cpu", attention="sdpa").variant.dit.attention == "sdpa"  # the user overrides
    with pytest.raises(ValueError, match="stores int8 DiT blocks, so it cannot run them as fp8"):
        wanrt.load(engine, device="cpu", scheme="fp8")
    with pytest.raises(ValueError, match="stores int8 text blocks"):
        wanrt.load(engine, device="cpu", text_scheme="bf16")


@pytest.mark.parametrize("scheme,text_scheme", [("fp8", "fp8"), ("w8a16", "int8")])
def test_a_checkpoint_quantized_on_load_equals_its_engine(checkpoints, tmp_path, scheme, text_scheme):
    out = export_engine(checkpoints["t2v", "official"], tmp_path / "e", scheme, progress=False,
                        text_scheme=text_scheme)
    on_load = wanrt.load(checkpoints["t2v", "official"], device="cpu", scheme=scheme, text_scheme=text_scheme)
    assert np.array_equal(on_load.generate(PROMPT, **KW).frames,
                          wanrt.load(out, device="cpu").generate(PROMPT, **KW).frames)
    assert on_load.dit_store.layout.nbytes < wanrt.load(checkpoints["t2v", "official"], device="cpu") \
        .dit_store.layout.nbytes  # the blocks were held quantized, not only computed so


def test_the_cli_flags_reach_the_run(checkpoints, tmp_path, capsys):
    assert main(["generate", "--model", str(checkpoints["t2v", "official"]), "--prompt", PROMPT, "--size", "32*32",
                 "--frame_num", "5", "--attention", "int8", "--scheme", "w8a16", "--text-scheme", "fp8",
                 "--sample_guide_scale", "1", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "attention int8, DiT blocks w8a16, text blocks fp8" in out and "x 1 DiT pass," in out
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["generate", "--prompt", PROMPT, "--attention", "flash"])
    assert main(["export", "--model", str(checkpoints["t2v", "official"]), "--out", str(tmp_path / "e"),
                 "--text-scheme", "int8", "--attention", "sdpa"]) == 0
    assert open_engine(tmp_path / "e").manifest["options"]["text_scheme"] == "int8"


def test_guidance_1_is_one_pass_and_equals_the_conditional_prediction(checkpoints, monkeypatch):
    pipe = wanrt.load(checkpoints["t2v", "official"], device="cpu")
    calls, prompts = [], []
    denoise, encode = pipe.dit.denoise, pipe._encode_text
    monkeypatch.setattr(pipe.dit, "denoise", lambda x, t, c, *a: calls.append(len(c)) or denoise(x, t, c, *a))
    monkeypatch.setattr(pipe, "_encode_text", lambda phase, p: prompts.append(p) or encode(phase, p))
    one_pass = pipe.generate(PROMPT, sample_guide_scale=1.0, **KW).frames
    assert calls == [1] * 3 and prompts == [[PROMPT]]  # no unconditional branch, no negative prompt
    calls.clear()
    monkeypatch.setattr(pipe, "_guidance", lambda req: (1.0, 2))  # the same request through both branches
    two_pass = pipe.generate(PROMPT, sample_guide_scale=1.0, **KW).frames
    assert sum(calls) == 2 * 3  # both branches at every step (one after the other: the blocks are resident)
    assert np.abs(one_pass.astype(int) - two_pass.astype(int)).max() <= 1  # u + (c - u) is c up to rounding


def test_cfg_branches_sharing_blocks_equal_separate_passes(checkpoints, monkeypatch):
    pipe = wanrt.load(checkpoints["t2v", "official"], device="cpu")
    dit, cfg = pipe.dit, pipe.variant.dit
    torch.manual_seed(0)
    x = torch.randn(1, cfg.in_dim, 2, 4, 4)
    t = dit.embed_time(torch.tensor([900.0, 500.0]))
    t = (t[0][:1], t[1][:1])
    contexts = [dit.embed_context(torch.randn(1, cfg.text_len, cfg.text_dim)) for _ in range(2)]
    lat = pipe.latent_shape(KW["size"], KW["frame_num"])
    with pipe._streamer(pipe.dit_store, pipe.plan(lat, 2).phase("denoise")) as weights:
        shared = dit.denoise(x, t, contexts, weights, chunk=5)
        assert all(torch.equal(a, dit.denoise(x, t, c, weights, chunk=5)) for a, c in zip(shared, contexts))

    plans = {}
    for share in (True, False):
        plan = pipe.plan(lat, KW["sample_steps"])
        phases = [dataclasses.replace(p, shared=share) if p.name == "denoise" else p for p in plan.phases]
        plans[share] = Plan(plan.budget, tuple(phases))
    frames = {}
    for share, plan in plans.items():
        monkeypatch.setattr(pipe, "plan", lambda *a, plan=plan, **k: plan)
        frames[share] = pipe.generate(PROMPT, **KW).frames
    assert np.array_equal(frames[True], frames[False])


def test_the_planner_shares_blocks_only_when_they_stream():
    from wanrt.runtime.config import get_variant
    from wanrt.runtime.plan import make_plan

    v, lat = get_variant("t2v-1.3B"), (21, 60, 104)
    resident = make_plan(v, lat, 4, 80 * 2**30).phase("denoise")
    assert not resident.blocks.streamed and resident.shared is False  # no second residual stream needed
    streamed = make_plan(v, lat, 4, 3 * 2**30).phase("denoise")
    assert streamed.blocks.streamed and streamed.shared is True and "share each block" in streamed.describe()
    one_branch = make_plan(v, lat, 4, 3 * 2**30, branches=1)
    assert one_branch.phase("denoise").shared is None
    assert one_branch.phase("text").activation_bytes < make_plan(v, lat, 4, 3 * 2**30).phase("text").activation_bytes


def test_a_quantized_text_encoder_stays_close_to_bf16(checkpoints):
    exact = wanrt.load(checkpoints["t2v", "official"], device="cpu")
    for text_scheme, bound in (("int8", 0.02), ("fp8", 0.08)):
        pipe = wanrt.load(checkpoints["t2v", "official"], device="cpu", text_scheme=text_scheme)
        plan = pipe.plan((2, 4, 4), 2)
        (got,), (want,) = pipe._encode_text(plan.phase("text"), [PROMPT]), exact._encode_text(plan.phase("text"),
                                                                                                 [PROMPT])
        err = float((got - want).norm() / want.norm())
        assert 0 < err < bound, (text_scheme, err)


def test_the_distill4_preset_runs_four_single_passes_and_flags_override_it(monkeypatch, capsys):
    pipe = wanrt.load(device="cpu")
    calls, timesteps = [], []
    denoise, embed = pipe.dit.denoise, pipe._embed
    monkeypatch.setattr(pipe.dit, "denoise", lambda x, t, c, *a: calls.append(len(c)) or denoise(x, t, c, *a))
    monkeypatch.setattr(pipe, "_embed", lambda phase, c, clip, t: timesteps.append(t) or embed(phase, c, clip, t))
    pipe.generate(PROMPT, preset="distill4", progress=False)
    assert calls == [1] * 4 and timesteps[0].tolist() == pytest.approx([1000, 937.5, 2500 / 3, 625])
    calls.clear()
    pipe.generate(PROMPT, preset="distill4", sample_guide_scale=3.0, progress=False)  # an explicit flag wins
    assert sum(calls) == 2 * 4
    with pytest.raises(ValueError, match="sample_steps 8 disagrees"):
        pipe.generate(PROMPT, preset="distill4", sample_steps=8, progress=False)
    with pytest.raises(ValueError, match="runs with sample_solver euler"):
        pipe.generate(PROMPT, denoising_step_list="1000,500", sample_solver="unipc", progress=False)
    assert main(["generate", "--prompt", PROMPT, "--preset", "distill4", "--plan"]) == 0
    assert "4 steps x 1 DiT pass" in capsys.readouterr().out
