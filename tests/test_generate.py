"""End to end on the CPU: `wanrt generate` writes an mp4 matching its flags; user errors get one clear line."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wanrt
from wanrt.cli import main
from wanrt.runtime import pipeline
from wanrt.runtime.video import read_mp4, to_uint8_frames

PROMPT = "a red circle moves right on a blue background"


@pytest.fixture(scope="module")
def t2v(checkpoints):
    return wanrt.load(checkpoints["t2v", "official"], device="cpu")


def run_cli(*args):
    return main(["generate", *map(str, args)])


def test_cli_writes_mp4_matching_flags(checkpoints, tmp_path):
    out = tmp_path / "sub" / "video.mp4"
    rc = run_cli("--model", checkpoints["t2v", "official"], "--prompt", PROMPT, "--size", "64*48", "--frame_num", 9,
                 "--sample_steps", 3, "--base_seed", 5, "--out", out)
    assert rc == 0
    frames, fps = read_mp4(out)
    assert frames.shape == (9, 48, 64, 3) and fps == 16
    assert not list(out.parent.glob("*.part"))  # written through a temp file, nothing left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file, not a private temp file's 0600


def test_same_seed_same_frames(t2v):
    kw = dict(size="32*32", frame_num=5, sample_steps=2, progress=False)
    a = t2v.generate(PROMPT, base_seed=3, **kw).frames
    b = t2v.generate(PROMPT, base_seed=3, **kw).frames
    c = t2v.generate(PROMPT, base_seed=4, **kw).frames
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frames_convert_where_the_video_is_as_one_formula(dtype):
    """Frame by frame on the video's device (the GPU where there is one): [-1, 1] to 0..255, rounded to nearest even,
    out-of-range values clipped, [3, F, H, W] to [F, H, W, 3]."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    video = (torch.randn(3, 4, 6, 10, generator=torch.Generator().manual_seed(0)) * 0.7).to(dtype)
    video[:, 0, 0, :4] = torch.tensor([-2.0, -1.0, 1.0, 3.0], dtype=dtype)
    frames = to_uint8_frames(video.to(dev))
    want = np.rint((np.clip(video.float().numpy(), -1, 1) + 1) * 127.5).astype(np.uint8).transpose(1, 2, 3, 0)
    assert frames.dtype == np.uint8 and frames.shape == (4, 6, 10, 3) and np.array_equal(frames, want)
    assert frames[0, 0, :4, 0].tolist() == [0, 0, 255, 255]


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_both_layouts_generate_the_same_video(checkpoints, layout):
    pipe = wanrt.load(checkpoints["i2v", layout], device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    video = pipe.generate(PROMPT, image=image, size="64*48", frame_num=5, sample_steps=2, base_seed=1,
                          progress=False)
    assert video.frames.shape[:3] == (5, 32, 64)  # official rule: aspect kept, floored to 16 px, under 64*48 pixels
    if layout == "official":
        test_both_layouts_generate_the_same_video.first = video.frames
    else:
        # Same weights; only float rounding may differ (kernels see differently aligned buffers): one uint8 level.
        diff = np.abs(video.frames.astype(int) - test_both_layouts_generate_the_same_video.first)
        assert diff.max() <= 1 and diff.mean() < 1e-2


def test_long_prompt_is_truncated_with_a_warning(t2v):
    with pytest.warns(UserWarning, match="dropped"):
        t2v.generate("red circle " * 400, size="32*32", frame_num=1, sample_steps=1, base_seed=0, progress=False)


@pytest.mark.parametrize("flags,message", [
    (["--size", "60*48"], "multiples of 16"),
    (["--size", "640*480"], "not supported by tiny-t2v"),
    (["--size", "64x48"], "width\\*height"),
    (["--frame_num", "8"], "4n\\+1"),
    (["--image", "missing.png"], "cannot read image"),
])
def test_user_errors_are_one_line(checkpoints, tmp_path, capsys, flags, message):
    rc = run_cli("--model", checkpoints["t2v", "official"], "--prompt", PROMPT, "--size", "32*32", "--frame_num", 5,
                 *flags, "--out", tmp_path / "v.mp4")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("wanrt: error: ") and len(err.strip().splitlines()) == 1
    assert pytest.importorskip("re").search(message, err)
    assert not (tmp_path / "v.mp4").exists()


def test_unreadable_image_and_broken_checkpoint(checkpoints, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert run_cli("--model", checkpoints["i2v", "official"], "--prompt", PROMPT, "--image", bad, "--size", "32*32",
                   "--frame_num", 5, "--out", tmp_path / "v.mp4") == 2
    assert "cannot read image" in capsys.readouterr().err

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["t2v", "official"], broken)
    vae = broken / "Wan2.1_VAE.pth"
    vae.write_bytes(vae.read_bytes()[:1000])
    assert run_cli("--model", broken, "--prompt", PROMPT, "--out", tmp_path / "v.mp4") == 2
    err = capsys.readouterr().err
    assert "Wan2.1_VAE.pth" in err and "Traceback" not in err


def test_console_script_is_installed(tmp_path):
    exe = Path(sys.executable).parent / "wanrt"  # the venv's console script, as `pip install` made it
    proc = subprocess.run([exe, "generate", "--model", tmp_path / "none", "--prompt", "x"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "checkpoint directory not found" in proc.stderr


def test_plan_flag_prints_the_plan_and_a_too_small_budget_is_refused(checkpoints, tmp_path, capsys, monkeypatch):
    model = checkpoints["t2v", "official"]
    assert run_cli("--model", model, "--prompt", PROMPT, "--size", "64*64", "--frame_num", 17, "--plan") == 0
    out = capsys.readouterr().out
    assert "denoise" in out and "decode" in out and "host: DiT pinned RAM" in out
    assert "no VRAM budget (CPU)" in out

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the budget was checked")

    monkeypatch.setattr(pipeline, "split_blocks", no_weights)  # loading starts there: minutes for a 14B model
    assert run_cli("--model", model, "--prompt", PROMPT, "--vram-budget", "1MiB", "--out", tmp_path / "v.mp4") == 2
    err = capsys.readouterr().err
    assert "needs at least" in err and "--vram-budget" in err and "Traceback" not in err
    assert not (tmp_path / "v.mp4").exists()
    with pytest.raises(SystemExit):
        run_cli("--model", model, "--prompt", PROMPT, "--vram-budget", "lots")
