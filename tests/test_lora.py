"""LoRAs in each dialect, merged by us and by diffusers (load_lora_weights + fuse_lora) on identical base weights."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import wanrt
from wanrt.cli import main
from wanrt.export.engine import export_engine
from wanrt.kernels.quantize import quantize_rows_reference
from wanrt.quant.formats import QUANTIZED_LINEARS, SCHEME_INFO, dequantize_block
from wanrt.runtime.checkpoint import open_checkpoint
from wanrt.runtime.dit import WanDiT, dit_from_diffusers, linear
from wanrt.runtime.engine import open_engine
from wanrt.runtime.lora import merge_loras, read_lora

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
RANK = 4
PROMPT = "a red circle moves right on a blue background"


def dit_output(state: dict, cfg) -> torch.Tensor:
    """Our DiT in fp32 on fixed inputs with these weights."""
    model = WanDiT(cfg)
    model.load_state_dict(state)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_dim, 2, 4, 4, generator=g)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([700.0]), ctx)


def diffusers_fused(checkpoints, lora_file) -> dict:
    """diffusers' WanPipeline with the LoRA loaded and fused, as official-named weights."""
    pipe = diffusers.WanPipeline.from_pretrained(checkpoints["t2v", "diffusers"])
    pipe.load_lora_weights(lora_file)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return dit_from_diffusers(pipe.transformer.state_dict())


def peft_lora(checkpoints, path):
    """A LoRA written by diffusers' own save_lora_weights from a PEFT adapter, with its metadata (alpha 8, rank 4)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = diffusers.WanTransformer3DModel.from_pretrained(checkpoints["t2v", "diffusers"] / "transformer")
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"])
    model.add_adapter(config)
    diffusers.WanPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(model),
                                            transformer_lora_adapter_metadata=config.to_dict())
    return path / "pytorch_lora_weights.safetensors"


def hand_written_lora(cfg, path, dialect):
    """Files following the musubi (lora_unet_*, lora_down/up, alpha) or ComfyUI (diffusion_model.*, lora_A/B, diff_b,
    diff_m) conventions."""
    g = torch.Generator().manual_seed(3)
    out = {}
    for i in range(cfg.num_layers):
        for name in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                     "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"):  # all of a block's linears, as musubi writes
            n_out, n_in = (cfg.ffn_dim, cfg.dim) if name == "ffn.0" else (cfg.dim, cfg.ffn_dim) if name == "ffn.2" \
                else (cfg.dim, cfg.dim)
            down, up = torch.randn(RANK, n_in, generator=g) * 0.1, torch.randn(n_out, RANK, generator=g) * 0.1
            if dialect == "musubi":
                key = f"lora_unet_blocks_{i}_{name.replace('.', '_')}"
                out |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
            else:
                key = f"diffusion_model.blocks.{i}.{name}"
                out |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
        if dialect == "comfy":
            out[f"diffusion_model.blocks.{i}.self_attn.q.diff_b"] = torch.randn(cfg.dim, generator=g) * 0.1
            out[f"diffusion_model.blocks.{i}.diff_m"] = torch.randn(1, 6, cfg.dim, generator=g) * 0.1
    file = path / f"{dialect}.safetensors"
    save_file(out, file)
    return file


@pytest.mark.parametrize("dialect", ["peft", "musubi", "comfy"])
def test_each_dialect_merges_as_diffusers_does(checkpoints, tmp_path, dialect):
    base = open_checkpoint(checkpoints["t2v", "official"])
    cfg = base.variant.dit
    file = peft_lora(checkpoints, tmp_path) if dialect == "peft" else hand_written_lora(cfg, tmp_path, dialect)
    ours = merge_loras(base.dit_state(), [read_lora(str(file), cfg)])
    theirs = diffusers_fused(checkpoints, file)
    if dialect == "comfy":  # diffusers drops modulation deltas (diff_m): check ours against the merge directly
        lora = read_lora(str(file), cfg)
        for i in range(cfg.num_layers):
            name = f"blocks.{i}.modulation"
            assert torch.allclose(ours[name], base.dit_state()[name] + lora.deltas[name][0][0], atol=1e-6)
            theirs[name] = ours[name]
    changed = [k for k in ours if not torch.equal(ours[k], base.dit_state()[k])]
    assert len(changed) >= 2 * cfg.num_layers  # the LoRA did something
    want, got = dit_output(theirs, cfg), dit_output(ours, cfg)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


@pytest.mark.parametrize("spelling", [
    lambda i, n, c: f"base_model.model.blocks.{i}.{n}.{c.replace('.', '.default.')}",  # raw PEFT, official model
    lambda i, n, c: f"pipe.dit.blocks.{i}.{n}.{c}",  # DiffSynth
    lambda i, n, c: "blocks.{}.{}.{}".format(i, {"self_attn.q": "attn1.to_q", "ffn.0": "ffn.net.0.proj"}[n], c),
    lambda i, n, c: f"lycoris_blocks_{i}_{n.replace('.', '_')}.{c.replace('_A', '_down').replace('_B', '_up')}",
], ids=["raw PEFT", "DiffSynth", "diffusers without prefix", "LyCORIS"])
def test_other_spellings_of_the_dialects_read_as_the_official_names(checkpoints, tmp_path, spelling):
    cfg = open_checkpoint(checkpoints["t2v", "official"]).variant.dit
    g = torch.Generator().manual_seed(4)
    pairs = {(i, n): (torch.randn(RANK, cfg.dim, generator=g), torch.randn(cfg.ffn_dim if n == "ffn.0" else cfg.dim,
                                                                        RANK, generator=g))
             for i in range(cfg.num_layers) for n in ("self_attn.q", "ffn.0")}
    official = {f"diffusion_model.blocks.{i}.{n}.lora_{ab}.weight": t for (i, n), (a, b) in pairs.items()
                for ab, t in (("A", a), ("B", b))}
    other = {spelling(i, n, f"lora_{ab}.weight"): t for (i, n), (a, b) in pairs.items()
             for ab, t in (("A", a), ("B", b))}
    save_file(official, tmp_path / "official.safetensors")
    save_file(other, tmp_path / "other.safetensors")
    want, got = (read_lora(str(tmp_path / f), cfg).deltas for f in ("official.safetensors", "other.safetensors"))
    assert want.keys() == got.keys() and len(want) == 2 * cfg.num_layers
    assert all(torch.equal(want[k][0][0], got[k][0][0]) and torch.equal(want[k][0][1], got[k][0][1]) for k in want)


def test_a_modulation_delta_in_kijais_spelling(checkpoints, tmp_path):
    cfg = open_checkpoint(checkpoints["t2v", "official"]).variant.dit
    delta = torch.randn(1, 6, cfg.dim)
    for name, key in (("m", "diffusion_model.blocks.1.diff_m"), ("kj", "diffusion_model.blocks.1.modulation.diff")):
        save_file({key: delta}, tmp_path / f"{name}.safetensors")
    a, b = (read_lora(str(tmp_path / f"{n}.safetensors"), cfg).deltas for n in ("m", "kj"))
    assert list(a) == list(b) == ["blocks.1.modulation"] and torch.equal(a["blocks.1.modulation"][0][0], delta)


def test_strength_and_several_loras_add_up(checkpoints, tmp_path):
    base = open_checkpoint(checkpoints["t2v", "official"])
    cfg = base.variant.dit
    a, b = hand_written_lora(cfg, tmp_path, "musubi"), hand_written_lora(cfg, tmp_path, "comfy")
    state = base.dit_state()
    half = merge_loras(state, [read_lora(f"{a}:0.5", cfg)])
    both = merge_loras(state, [read_lora(f"{a}:0.5", cfg), read_lora(str(b), cfg)])
    then = merge_loras(half, [read_lora(str(b), cfg)])
    name = "blocks.1.self_attn.q.weight"
    full = merge_loras(state, [read_lora(str(a), cfg)])
    assert torch.allclose(half[name] - state[name], 0.5 * (full[name] - state[name]), atol=1e-6)
    assert torch.allclose(both[name], then[name], atol=1e-6)


def test_a_t2v_lora_on_the_i2v_model_leaves_the_image_projections(checkpoints, tmp_path):
    i2v = open_checkpoint(checkpoints["i2v", "official"])
    file = hand_written_lora(i2v.variant.dit, tmp_path, "comfy")
    merged = merge_loras(i2v.dit_state(), [read_lora(str(file), i2v.variant.dit)])
    assert torch.equal(merged["blocks.0.cross_attn.k_img.weight"], i2v.dit_state()["blocks.0.cross_attn.k_img.weight"])
    assert not torch.equal(merged["blocks.0.cross_attn.k.weight"], i2v.dit_state()["blocks.0.cross_attn.k.weight"])


def test_generate_and_export_take_loras_with_the_same_flag(checkpoints, tmp_path):
    ckpt = checkpoints["t2v", "official"]
    cfg = open_checkpoint(ckpt).variant.dit
    file = hand_written_lora(cfg, tmp_path, "musubi")
    kw = dict(size="32*32", frame_num=5, sample_steps=2, base_seed=1, progress=False)
    plain = wanrt.load(ckpt, device="cpu").generate(PROMPT, **kw).frames
    merged = wanrt.load(ckpt, device="cpu", loras=[f"{file}:0.8"]).generate(PROMPT, **kw).frames
    assert not (plain == merged).all()
    assert main(["export", "--model", str(ckpt), "--out", str(tmp_path / "e"), "--lora", f"{file}:0.8"]) == 0
    engine = open_engine(tmp_path / "e")
    assert engine.manifest["loras"][0]["strength"] == 0.8 and len(engine.manifest["loras"][0]["sha256"]) == 64
    assert (wanrt.load(tmp_path / "e", device="cpu").generate(PROMPT, **kw).frames == merged).all()
    with pytest.warns(UserWarning, match="already merged into this engine .at strength 0.8.; it is now added a second"):
        wanrt.load(tmp_path / "e", device="cpu", loras=[str(file)])


@pytest.mark.parametrize("scheme,bound", [("fp8", 4e-2), ("int8", 1e-2)])
def test_merge_then_quantize(checkpoints, tmp_path, scheme, bound):
    """A LoRA merged into a quantized engine: each linear stays as close to the bf16 merged weights as the scheme
    keeps any weight."""
    ckpt = checkpoints["t2v", "official"]
    cfg = open_checkpoint(ckpt).variant.dit
    file = hand_written_lora(cfg, tmp_path, "comfy")
    want = merge_loras(open_checkpoint(ckpt).dit_state(), [read_lora(str(file), cfg)])
    engine = open_engine(export_engine(ckpt, tmp_path / scheme, scheme, progress=False, loras=(str(file),)))
    state = engine.dit_state()
    for i in range(cfg.num_layers):
        block = {k.removeprefix(f"blocks.{i}."): v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        got = dequantize_block(block, torch.float32)
        for name in QUANTIZED_LINEARS:
            if f"{name}.weight" in got:
                w = want[f"blocks.{i}.{name}.weight"].float()
                assert float((got[f"{name}.weight"] - w).norm() / w.norm()) < bound


@pytest.mark.parametrize("scheme,bound", [("fp8", 4e-2), ("int8", 1e-2), ("nf4", 1.5e-1)])
def test_side_path_on_a_quantized_engine_matches_merging(checkpoints, tmp_path, scheme, bound):
    """A LoRA given to an engine that stores quantized blocks runs beside its linears (x @ down^T @ up^T after the
    quantized GEMM): each linear's output stays as close to the bf16 merged linear's as merge-then-quantize does, also
    when the activations come quantized; biases and modulation are merged."""
    ckpt = checkpoints["t2v", "official"]
    cfg = open_checkpoint(ckpt).variant.dit
    file = hand_written_lora(cfg, tmp_path, "comfy")
    want = merge_loras(open_checkpoint(ckpt).dit_state(), [read_lora(str(file), cfg)])
    pipe = wanrt.load(export_engine(ckpt, tmp_path / scheme, scheme, progress=False), device="cpu",
                      loras=[f"{file}:1.0"])
    assert pipe.variant.dit.lora_rank == RANK and "LoRA side path of rank 4" in pipe.describe_plan(size="32*32")
    act = SCHEME_INFO[scheme].activation_dtype
    g = torch.Generator().manual_seed(5)
    for i in range(cfg.num_layers):
        w = pipe.dit_store.layout.views(pipe.dit_store.host_bytes(i))
        assert torch.equal(w["modulation"], want[f"blocks.{i}.modulation"])
        for name in ("self_attn.q", "cross_attn.v", "ffn.0", "ffn.2"):
            weight, bias = want[f"blocks.{i}.{name}.weight"], want[f"blocks.{i}.{name}.bias"]
            x = torch.randn(3, weight.shape[1], generator=g)
            ref = F.linear(x, weight, bias)
            for given in [x] + ([quantize_rows_reference(x, act)] if act else []):
                got = linear(given, w, name, pipe.variant.dit).float()
                assert float((got - ref).norm() / ref.norm()) < bound, (name, scheme)
    kw = dict(size="32*32", frame_num=5, sample_steps=2, base_seed=1, progress=False)
    plain = wanrt.load(tmp_path / scheme, device="cpu")
    assert not (pipe.generate(PROMPT, **kw).frames == plain.generate(PROMPT, **kw).frames).all()
    block_bytes = [p.plan((2, 4, 4), 2).phase("denoise").blocks.block_bytes for p in (plain, pipe)]
    assert block_bytes[1] >= block_bytes[0] + RANK * (cfg.dim + cfg.ffn_dim) * 2 * 4  # the factors are priced


@pytest.mark.parametrize("make,message", [
    (lambda p, cfg: save_file({"weight": torch.zeros(2, 2)}, p), "match no part of a Wan2.1 DiT"),
    (lambda p, cfg: save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(RANK, 3),
                               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(5, RANK)}, p),
     "a LoRA for another model size"),
    (lambda p, cfg: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"), "cannot read LoRA"),
    (lambda p, cfg: save_file({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(RANK, 3)}, p),
     "only one of its two low-rank matrices"),
])
def test_bad_lora_files_are_one_line(checkpoints, tmp_path, capsys, make, message):
    file = tmp_path / "bad.safetensors"
    make(file, None)
    assert main(["generate", "--model", str(checkpoints["t2v", "official"]), "--prompt", PROMPT, "--lora", str(file),
                 "--out", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wanrt: error: ") and len(err.strip().splitlines()) == 1 and message in err, err
    with pytest.raises(ValueError, match="read as safetensors only"):
        read_lora(str(tmp_path / "x.pt"), open_checkpoint(checkpoints["t2v", "official"]).variant.dit)
