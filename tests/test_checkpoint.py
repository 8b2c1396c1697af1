"""Readers for both layouts: same weights, diffusers parity through the readers, clear errors on bad files."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanrt.runtime.checkpoint import CheckpointError, open_checkpoint
from wanrt.runtime.config import get_variant
from wanrt.runtime.clip import CLIPVision
from wanrt.runtime.dit import WanDiT
from wanrt.runtime.text import UMT5Encoder
from wanrt.runtime.vae import WanVAE
from wanrt.testing.random_checkpoint import random_states, save_sharded, write_official, write_random_checkpoint

pytest.importorskip("diffusers")

COMPONENTS = ("dit_state", "vae_state", "text_state")


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def build(cls, cfg, state):
    model = cls(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_layouts_hold_identical_weights(checkpoints, task):
    a, b = open_checkpoint(checkpoints[task, "diffusers"]), open_checkpoint(checkpoints[task, "official"])
    assert (a.layout, b.layout) == ("diffusers", "official")
    assert a.variant == b.variant and a.variant.name == f"tiny-{task}"
    for component in COMPONENTS + (("clip_state",) if task == "i2v" else ()):
        x, y = getattr(a, component)(), getattr(b, component)()
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), component


@pytest.mark.parametrize("layout", ["diffusers", "official"])
@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_dit_through_readers_matches_diffusers(checkpoints, task, layout):
    from diffusers import WanTransformer3DModel

    ckpt = open_checkpoint(checkpoints[task, layout])
    cfg = ckpt.variant.dit
    ours = build(WanDiT, cfg, ckpt.dit_state())
    ref = WanTransformer3DModel.from_pretrained(checkpoints[task, "diffusers"] / "transformer").eval()
    x, t = torch.randn(1, cfg.in_dim, 2, 6, 8), torch.tensor([412.0])
    context = torch.randn(1, cfg.text_len, cfg.text_dim)
    clip = torch.randn(1, cfg.image_tokens, cfg.image_dim) if task == "i2v" else None
    with torch.no_grad():
        err = max_rel_err(ours(x, t, context, clip), ref(x, t, context, encoder_hidden_states_image=clip)[0])
    assert err <= 1e-5


@pytest.mark.parametrize("layout", ["diffusers", "official"])
def test_vae_and_text_through_readers_match_reference(checkpoints, layout):
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    ckpt = open_checkpoint(checkpoints["t2v", layout])
    root = checkpoints["t2v", "diffusers"]
    vae = build(WanVAE, ckpt.variant.vae, ckpt.vae_state())
    ref_vae = AutoencoderKLWan.from_pretrained(root / "vae").eval()
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    mean = torch.tensor(ckpt.variant.vae.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ckpt.variant.vae.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        z_ref = ref_vae.encode(video).latent_dist.mean
        assert max_rel_err(vae.encode(video) * std + mean, z_ref) <= 1e-5
        assert max_rel_err(vae.decode((z_ref - mean) / std), ref_vae.decode(z_ref).sample) <= 1e-5

    text = build(UMT5Encoder, ckpt.variant.text, ckpt.text_state())
    ref_text = UMT5EncoderModel.from_pretrained(root / "text_encoder").eval()
    ids = torch.randint(3, ckpt.variant.text.vocab, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with torch.no_grad():
        torch.testing.assert_close(text(ids, mask), ref_text(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["diffusers", "official"])
def test_clip_through_readers_matches_transformers(checkpoints, layout):
    from transformers import CLIPVisionModel

    ckpt = open_checkpoint(checkpoints["i2v", layout])
    ours = build(CLIPVision, ckpt.variant.clip, ckpt.clip_state())
    ref = CLIPVisionModel.from_pretrained(checkpoints["i2v", "diffusers"] / "image_encoder").eval()
    s = ckpt.variant.clip.image_size
    pixels = torch.randn(2, 3, s, s)
    with torch.no_grad():
        want = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        assert max_rel_err(ours(pixels), want) <= 1e-5


def test_sharded_official_dit_reads_like_single_file(checkpoints, tmp_path):
    src = checkpoints["t2v", "official"]
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    state = load_file(dst / "diffusion_pytorch_model.safetensors")
    (dst / "diffusion_pytorch_model.safetensors").unlink()
    third = sum(t.nbytes for t in state.values()) // 3
    save_sharded(state, dst, "diffusion_pytorch_model.safetensors", max_bytes=third)
    shards = sorted(p.name for p in dst.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) >= 3 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert not (dst / "diffusion_pytorch_model.safetensors").exists()
    got = open_checkpoint(dst).dit_state()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_random_checkpoint_draws_each_tensor_alike_in_any_order_in_the_released_dtypes(tmp_path):
    """`wanrt random-checkpoint` draws a tensor as it writes it (a full-size model never sits whole in RAM): the
    values must not depend on the order they are read in, and the files hold the releases' dtypes."""
    v = get_variant("tiny-t2v")
    states = random_states(v, seed=3)
    dit = states["dit"]
    names = list(dit)
    forward = {k: dit[k] for k in names}
    backward = {k: dit[k] for k in reversed(names)}
    assert all(torch.equal(forward[k], backward[k]) for k in names)
    assert not torch.equal(random_states(v, seed=4)["dit"][names[0]], forward[names[0]])
    ckpt = open_checkpoint(write_official(tmp_path / "ckpt", v, states))
    got = ckpt.dit_state()
    assert all(torch.equal(got[k], forward[k]) for k in names)
    assert {t.dtype for t in got.values()} == {torch.float32}
    assert {t.dtype for t in ckpt.text_state().values()} == {torch.bfloat16}


def copy_of(checkpoints, tmp_path, task="t2v", layout="official"):
    dst = tmp_path / "copy"
    shutil.copytree(checkpoints[task, layout], dst)
    return dst


@pytest.mark.parametrize("name,reader", [("diffusion_pytorch_model.safetensors", "dit_state"),
                                         ("Wan2.1_VAE.pth", "vae_state"),
                                         ("models_t5_umt5-xxl-enc-bf16.pth", "text_state")])
def test_missing_or_truncated_file_is_named(checkpoints, tmp_path, name, reader):
    root = copy_of(checkpoints, tmp_path)
    data = (root / name).read_bytes()
    (root / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        getattr(open_checkpoint(root), reader)()
    (root / name).unlink()
    with pytest.raises(CheckpointError, match="missing: .*" + name.replace(".", r"\.")):
        getattr(open_checkpoint(root), reader)()


class NotATensor:
    pass


def test_pickled_objects_are_refused(checkpoints, tmp_path):
    root = copy_of(checkpoints, tmp_path)
    torch.save({"decoder.conv1.weight": torch.ones(1), "payload": NotATensor()}, root / "Wan2.1_VAE.pth")
    with pytest.raises(CheckpointError, match="Wan2.1_VAE"):
        open_checkpoint(root).vae_state()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        open_checkpoint(tmp_path)


def test_a_block_of_the_wrong_shape_is_named(checkpoints, tmp_path):
    import wanrt

    root = copy_of(checkpoints, tmp_path)
    state = load_file(root / "diffusion_pytorch_model.safetensors")
    state["blocks.1.ffn.0.weight"] = state["blocks.1.ffn.0.weight"][:-1].clone()
    del state["blocks.0.self_attn.q.bias"]
    save_file(state, root / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"DiT weights do not match its config \(2 layers\): missing "
                                         r"\['blocks.0.self_attn.q.bias'\]; wrong shape \['blocks.1.ffn.0.weight"):
        wanrt.load(root, device="cpu")


def test_a_dit_quantized_by_optimum_quanto_reads_as_our_int8(checkpoints, tmp_path):
    """As Wan2GP ships DiTs (`*_quanto_*int8.safetensors`): a tiny WanDiT quantized and frozen by optimum-quanto
    itself, saved as its state dict. Its block linears become our int8 weights unchanged, and the DiT computes what
    quanto's own model computes (our w8a16 is weight-only, as the file is, with bf16 activations)."""
    quanto = pytest.importorskip("optimum.quanto")
    import wanrt

    root = copy_of(checkpoints, tmp_path)
    ckpt = open_checkpoint(root)
    model = WanDiT(ckpt.variant.dit)
    model.load_state_dict(ckpt.dit_state())
    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "blocks.0.ffn.0.weight._data" in state
    save_file(state, root / "diffusion_pytorch_model.safetensors")

    ours = open_checkpoint(root)
    assert ours.variant.dit.quant == "int8" and ours.variant.name == ckpt.variant.name
    got = ours.dit_state()
    assert torch.equal(got["blocks.1.ffn.0.weight"], state["blocks.1.ffn.0.weight._data"])
    assert torch.equal(got["blocks.1.ffn.0.weight_scale"], state["blocks.1.ffn.0.weight._scale"].reshape(-1))
    assert "blocks.0.self_attn.q.input_scale" not in got and got["head.head.weight"].dtype == torch.float32

    pipe = wanrt.load(root, device="cpu", scheme="w8a16")
    assert pipe.variant.dit.quant == "w8a16"
    torch.manual_seed(0)
    x, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([700.0])
    ctx = torch.randn(1, pipe.variant.dit.text_len, pipe.variant.dit.text_dim)
    plan = pipe.plan((2, 4, 4), 1)
    with torch.no_grad(), pipe._streamer(pipe.dit_store, plan.phase("denoise")) as weights:
        mine = pipe.dit.denoise(x, pipe.dit.embed_time(t), pipe.dit.embed_context(ctx), weights)
        theirs = model(x, t, ctx)  # quanto dequantizes each weight for a float32 GEMM
    assert float((mine - theirs).norm() / theirs.norm()) < 5e-3  # w8a16 rounds activations to bf16, quanto not
    with pytest.raises(ValueError, match="stores int8 DiT blocks"):
        wanrt.load(root, device="cpu", scheme="fp8")


def test_diffusers_layout_refuses_a_model_that_cannot_fit_in_ram(tmp_path, monkeypatch):
    """It builds each model whole in fp32: one clear line instead of an OOM kill, and nothing written."""
    from wanrt.runtime import pipeline

    monkeypatch.setattr(pipeline, "available_ram", lambda: 2**30)
    with pytest.raises(ValueError, match="layout official"):
        write_random_checkpoint(tmp_path / "ckpt", "t2v-1.3B", layout="diffusers")
    assert not any(tmp_path.iterdir())
