"""Nothing lost, nothing run, nothing silently wrong: outputs never destroy what wanrt did not write, engine swaps and
interrupts leave the old engine or the new one, native code runs only from trusted engines, and a run that cannot
give a valid video writes none."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import wanrt
from wanrt.cli import main
from wanrt.export.engine import export_engine
from wanrt.runtime import atomic
from wanrt.runtime.engine import MANIFEST, open_engine, sha256
from wanrt.runtime.pipeline import DEMO_MODEL, GenerationError, WanPipeline

PROMPT = "a red circle moves right on a blue background"


def tree(root: Path) -> dict:
    """Every file under root with its bytes: what must be unchanged after a refused or interrupted command."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli(*args) -> int:
    return main([*map(str, args)])


@pytest.fixture(scope="module")
def engine(checkpoints, tmp_path_factory):
    return export_engine(checkpoints["t2v", "official"], tmp_path_factory.mktemp("e") / "engine", progress=False)


# --- 1. --out never deletes what wanrt did not write -----------------------------------------------------------------
def test_random_checkpoint_refuses_an_existing_folder(tmp_path, capsys, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    before = tree(tmp_path)
    assert cli("random-checkpoint", "--out", mine) == 2
    monkeypatch.chdir(mine)
    assert cli("random-checkpoint", "--out", ".") == 2
    assert tree(tmp_path) == before
    assert capsys.readouterr().err.count("refusing to touch it") == 2


def test_export_refuses_a_folder_that_only_looks_like_an_engine(checkpoints, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / MANIFEST).write_text('{"my": "own manifest"}')
    (notes / "data.csv").write_text("1,2,3")
    before = tree(tmp_path)
    assert cli("export", "--model", checkpoints["t2v", "official"], "--out", notes, "--overwrite") == 2
    assert tree(tmp_path) == before and "not written by wanrt" in capsys.readouterr().err


def test_an_engine_is_replaced_only_with_overwrite_and_only_if_it_holds_nothing_else(checkpoints, tmp_path, capsys):
    out = tmp_path / "engine"
    assert cli("export", "--model", checkpoints["t2v", "official"], "--out", out) == 0
    before = tree(tmp_path)
    assert cli("export", "--model", checkpoints["t2v", "official"], "--out", out, "--scheme", "int8") == 2
    assert "pass --overwrite" in capsys.readouterr().err and tree(tmp_path) == before
    (out / "my-notes.txt").write_text("keep me")
    assert cli("export", "--model", checkpoints["t2v", "official"], "--out", out, "--overwrite") == 2
    assert (out / "my-notes.txt").read_text() == "keep me"
    (out / "my-notes.txt").unlink()
    assert cli("export", "--model", checkpoints["t2v", "official"], "--out", out, "--scheme", "int8",
               "--overwrite") == 0
    assert open_engine(out).manifest["schemes"]["dit_blocks"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]  # no temporary or old folder left


# --- 2. replacing an engine is atomic; two writers are kept apart -----------------------------------------------------
@pytest.fixture
def sigint_raises():
    """Ctrl-C raises KeyboardInterrupt here, as in a terminal, even when the suite was started with SIGINT ignored (a
    background job: `make test &`)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupt_during_the_swap_waits_until_the_new_engine_is_in(checkpoints, tmp_path, monkeypatch,
                                                                       sigint_raises):
    out = export_engine(checkpoints["t2v", "official"], tmp_path / "engine", progress=False)
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        if str(path).endswith(".old"):  # deleting the old engine: Ctrl-C arrives right now
            os.kill(os.getpid(), signal.SIGINT)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(atomic.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        export_engine(checkpoints["t2v", "official"], out, "int8", progress=False, overwrite=True)
    assert open_engine(out).manifest["schemes"]["dit_blocks"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_an_interrupt_while_exporting_keeps_the_old_engine(checkpoints, tmp_path, monkeypatch):
    import wanrt.export.engine as E

    out = export_engine(checkpoints["t2v", "official"], tmp_path / "engine", progress=False)
    before = tree(tmp_path)
    monkeypatch.setattr(E, "fidelity", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export_engine(checkpoints["t2v", "official"], out, "int8", progress=False, overwrite=True)
    assert tree(tmp_path) == before


def test_two_exports_to_one_target_are_kept_apart(checkpoints, tmp_path):
    out = tmp_path / "engine"
    with atomic.atomic_dir(out) as tmp:  # another export holds the target
        (tmp / "first.txt").write_text("the first writer's")
        with pytest.raises(ValueError, match="another wanrt process is writing"):
            export_engine(checkpoints["t2v", "official"], out, progress=False)
    assert list(tmp_path.iterdir()) == [out] and tree(out) == {"first.txt": b"the first writer's"}


# --- 3. compiled artifacts (native code) run only from trusted engines ------------------------------------------------
def _with_a_compiled_block(engine: Path, dst: Path) -> Path:
    """A copy of the engine with a 'compile' block added and its hash written into the manifest, as someone
    handing out a tampered engine would do: it verifies, but this machine never exported it."""
    shutil.copytree(engine, dst)
    (dst / "compiled").mkdir()
    (dst / "compiled" / "block.bin").write_bytes(b"native code")
    m = json.loads((dst / MANIFEST).read_text())
    m["backends"] = {"compile": {"file": "compiled/block.bin", "device": "cpu", "tokens": 1, "weights": []}}
    m["files"]["compiled/block.bin"] = {"sha256": sha256(dst / "compiled" / "block.bin"), "bytes": 11}
    (dst / MANIFEST).write_text(json.dumps(m))
    return dst


def test_compiled_blocks_run_only_from_trusted_engines(engine, tmp_path, monkeypatch):
    import wanrt.runtime.pipeline as P

    assert open_engine(engine).trusted  # exported here
    loaded = []
    monkeypatch.setattr(P, "CompiledBlock", lambda *a: loaded.append(a) or None)
    stranger = _with_a_compiled_block(engine, tmp_path / "stranger")
    assert not open_engine(stranger).trusted
    with pytest.warns(UserWarning, match="was not exported on this machine"):
        wanrt.load(stranger, device="cpu")
    assert loaded == []
    wanrt.load(stranger, device="cpu", trust_engine=True)
    assert len(loaded) == 1


# --- 4. non-finite numbers never reach a video -------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--sample_guide_scale", "nan"), ("--sample_guide_scale", "inf"),
                                        ("--sample_guide_scale", "1e30"), ("--sample_shift", "nan"),
                                        ("--sample_shift", "-1"), ("--sample_shift", "0")])
def test_non_finite_or_absurd_sampling_flags_are_refused(tmp_path, capsys, flag, value):
    assert cli("generate", "--prompt", PROMPT, flag, value, "--out", tmp_path / "v.mp4") == 2
    err = capsys.readouterr().err
    assert err.startswith("wanrt: error: " + flag[2:]) and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_non_finite_latents_write_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(WanPipeline, "_denoise", lambda self, phase, latents, *a: latents * float("nan"))
    with pytest.raises(GenerationError, match="NaN or inf"):
        wanrt.load(device="cpu").generate(PROMPT, progress=False)
    assert cli("generate", "--prompt", PROMPT, "--out", tmp_path / "v.mp4") == 1
    assert "NaN or inf" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


# --- 5. configs are bounded and checked against the weights before anything is built ----------------------------------
@pytest.mark.parametrize("value,message", [(10**9, "num_layers must be an integer in 1..256"),
                                           (3, r"weights do not match its config \(3 layers\): missing")])
def test_a_config_that_disagrees_with_its_weights_is_refused_at_once(checkpoints, tmp_path, capsys, value, message):
    root = shutil.copytree(checkpoints["t2v", "official"], tmp_path / "ckpt")
    config = json.loads((root / "config.json").read_text())
    config["num_layers"] = value
    (root / "config.json").write_text(json.dumps(config))
    assert cli("generate", "--model", root, "--prompt", PROMPT, "--out", tmp_path / "v.mp4") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and pytest.importorskip("re").search(message, err)


# --- 6. the same seed gives the same file -------------------------------------------------------------------------------
def test_the_same_seed_gives_the_same_mp4_bytes(tmp_path):
    for name in ("a.mp4", "b.mp4"):
        assert cli("generate", "--prompt", PROMPT, "--base_seed", 3, "--out", tmp_path / name) == 0
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


# --- interrupts: SIGINT and SIGTERM from outside ----------------------------------------------------------------------
def _interrupt(args: list[str], cwd: Path, wait_for: str, sig: int) -> int:
    """Start `python -m wanrt.cli ARGS`, send `sig` once `wait_for` shows on its stdout, and return its exit code."""
    proc = subprocess.Popen([sys.executable, "-m", "wanrt.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,  # SIGINT as in a terminal, even from a background job
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if wait_for in line or time.monotonic() > deadline:
            break
    time.sleep(0.2)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_generate_leaves_the_old_video(tmp_path, sig, code):
    (tmp_path / "v.mp4").write_bytes(b"yesterday's video")
    rc = _interrupt(["generate", "--prompt", PROMPT, "--sample_steps", "1000", "--out", "v.mp4"], tmp_path,
                    "encoding the prompts", sig)
    assert rc == code
    assert tree(tmp_path) == {"v.mp4": b"yesterday's video"}


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_export_leaves_the_old_engine(tmp_path, sig, code):
    out = export_engine(DEMO_MODEL, tmp_path / "engine", progress=False)
    before = tree(tmp_path)
    rc = _interrupt(["export", "--model", str(DEMO_MODEL), "--out", "engine", "--scheme", "int8", "--overwrite",
                     "--backends", "onnx"], tmp_path, "", sig)
    assert rc == code and tree(tmp_path) == before
    assert open_engine(out).manifest["schemes"]["dit_blocks"] == "bf16"
