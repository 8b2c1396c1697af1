"""The demo model's training script, a few steps on the CPU: both stages run, the losses are logged, and the result is
a checkpoint the pipeline loads and generates from (the real training run is on a GPU)."""
import json

import numpy as np

import wanrt
from training.train_demo import demo_variant, train


def test_training_runs_and_writes_a_loadable_checkpoint(tmp_path):
    variant = demo_variant(dim=64, layers=2, vae_dim=8, text_dim=32)
    out = train(tmp_path / "model", vae_steps=2, dit_steps=2, seed=0, variant=variant, batch_size=2)
    log = json.loads((out / "train_log.json").read_text())
    assert [e["stage"] for e in log["log"]] == ["vae", "vae", "dit", "dit"]
    assert all(np.isfinite(e["loss"]) and e["loss"] > 0 for e in log["log"])
    assert log["settings"]["seed"] == 0 and list(tmp_path.iterdir()) == [out]  # no temporary folder left
    pipe = wanrt.load(out, device="cpu")
    assert pipe.variant.name == "demo-t2v" and pipe.variant.sizes == ("64*64",)  # named by its config.json
    assert not list(out.rglob("*.pth"))  # safetensors only: nothing to unpickle
    video = pipe.generate("a red circle moves right on a blue background", frame_num=17, sample_steps=2,
                          base_seed=0, progress=False)
    assert video.frames.shape == (17, 64, 64, 3)
    # reproducible from its seed, however many processes draw the videos
    again = train(tmp_path / "again", vae_steps=2, dit_steps=2, seed=0, variant=variant, batch_size=2, workers=2)
    assert json.loads((again / "train_log.json").read_text())["log"] == log["log"]


def test_the_stages_can_run_in_separate_processes(tmp_path):
    """A VAE-only run (dit_steps=0) feeds a later DiT run through vae_from: the same VAE and latent statistics."""
    from safetensors.torch import load_file

    variant = demo_variant(dim=64, layers=2, vae_dim=8, text_dim=32)
    first = train(tmp_path / "vae", vae_steps=2, dit_steps=0, seed=0, variant=variant, batch_size=2)
    second = train(tmp_path / "dit", vae_steps=0, dit_steps=2, seed=0, variant=variant, batch_size=2, vae_from=first)
    a, b = (load_file(p / "Wan2.1_VAE.safetensors") for p in (first, second))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert wanrt.load(second, device="cpu").variant.vae == wanrt.load(first, device="cpu").variant.vae
    log = json.loads((second / "train_log.json").read_text())
    assert [e["stage"] for e in log["log"]] == ["vae", "vae", "dit", "dit"] and log["settings"]["vae_from"] == "vae"
    assert log["settings"]["before"]["dit_steps"] == 0  # the first run's settings


def test_the_decoder_stage_keeps_the_encoder_and_dit(tmp_path):
    """Stage 3 (dit_from) trains the VAE's decoder alone: the encoder, latent statistics, DiT and text encoder are
    the ones the DiT was trained with."""
    from safetensors.torch import load_file

    variant = demo_variant(dim=64, layers=2, vae_dim=8, text_dim=32)
    first = train(tmp_path / "dit", vae_steps=2, dit_steps=2, seed=0, variant=variant, batch_size=2)
    final = train(tmp_path / "final", vae_steps=0, dit_steps=0, seed=0, variant=variant, batch_size=2,
                  decoder_steps=2, dit_from=first)
    log = json.loads((final / "train_log.json").read_text())
    assert [e["stage"] for e in log["log"]] == ["vae", "vae", "dit", "dit", "decoder", "decoder"]
    assert log["settings"]["dit_from"] == "dit" and log["settings"]["before"]["dit_steps"] == 2
    for name in ("Wan2.1_VAE", "diffusion_pytorch_model", "models_t5_umt5-xxl-enc-bf16"):
        a, b = (load_file(p / f"{name}.safetensors") for p in (first, final))
        changed = {k for k in a if not a[k].equal(b[k])}
        if name == "Wan2.1_VAE":
            assert changed and all(k.startswith(("decoder.", "conv2.")) for k in changed), changed
        else:
            assert not changed, (name, changed)
    assert wanrt.load(final, device="cpu").variant.vae == wanrt.load(first, device="cpu").variant.vae
    # stage 2 continued from there (with the shape's latents weighted up): the DiT moves, the VAE stays
    more = train(tmp_path / "more", vae_steps=0, dit_steps=1, seed=1, variant=variant, batch_size=2, dit_from=final,
                 dit_shape_weight=4.0)
    assert json.loads((more / "train_log.json").read_text())["settings"]["dit_shape_weight"] == 4.0
    a, b = (load_file(p / "diffusion_pytorch_model.safetensors") for p in (final, more))
    assert any(not a[k].equal(b[k]) for k in a)
    a, b = (load_file(p / "Wan2.1_VAE.safetensors") for p in (final, more))
    assert all(a[k].equal(b[k]) for k in a)


def test_latent_shape_weights_mark_the_latent_positions_of_the_shape():
    """On the latent grid of a rendered clip (first frame alone, then 4 frames x 8x8 pixels per position): the
    weight where any of those pixels is the shape's, 1 elsewhere; the DiT's loss takes it with --dit-shape-weight."""
    import torch

    from training.synthetic import Scene, render
    from training.train_demo import latent_shape_weights, to_tensor

    scene = Scene("red", "square", "moves right", "blue", ((40, 70, 220), (40, 70, 220)))
    video = to_tensor(render(scene, 17, 64, seed=3)[None], "cpu")
    weights = latent_shape_weights(video, 4.0, (4, 8, 8))
    assert weights.shape == (1, 1, 5, 8, 8) and set(weights.unique().tolist()) == {1.0, 4.0}
    shape = (video - video[:, :, :, :1, :1]).abs().amax(1) > 0.2  # the background is plain: its corner pixel
    for lf, frames in enumerate([[0]] + [list(range(1 + 4 * i, 5 + 4 * i)) for i in range(4)]):
        want = shape[0, frames].any(0).reshape(8, 8, 8, 8).any(3).any(1)
        assert torch.equal(weights[0, 0, lf] > 1, want)
    centre = [(weights[0, 0, f] > 1).nonzero().float()[:, 1].mean() for f in range(5)]
    assert centre[0] < centre[-1]  # it moves right


def test_the_demo_lora_trains_and_loads_in_the_musubi_dialect(tmp_path):
    """training/train_lora.py, two steps: a file our reader maps onto every linear of the demo DiT (alpha = rank),
    whose pairs moved away from the base model (up starts at zero)."""
    from safetensors.torch import load_file

    from training.train_lora import LINEARS, train_lora
    from wanrt.runtime.lora import read_lora
    from wanrt.runtime.pipeline import DEMO_MODEL

    record = train_lora(tmp_path / "r.safetensors", steps=2, rank=4, batch=2)
    assert len(record["losses"]) == 2 and all(np.isfinite(record["losses"]))
    state = load_file(tmp_path / "r.safetensors")
    assert all(k.startswith("lora_unet_blocks_") for k in state)
    lora = read_lora(str(tmp_path / "r.safetensors"), wanrt.load(DEMO_MODEL, device="cpu").variant.dit)
    assert len(lora.deltas) == 6 * len(LINEARS)
    assert all(up.abs().max() > 0 and scale == 1.0 for terms in lora.deltas.values() for up, _, scale in terms)
