"""Bad input, through the CLI and the Python API: one clear line naming the problem (exit code 2), before any model is
loaded, with nothing existing modified and nothing partial left behind."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import wanrt
from wanrt.cli import main
from wanrt.export.engine import export_engine
from wanrt.runtime.engine import MANIFEST
from wanrt.runtime.options import MAX_IMAGE_SIDE
from wanrt.runtime.pipeline import WanPipeline, load_image

PROMPT = "a red circle moves right on a blue background"


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with a file that must survive every refused command; the commands run in it."""
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(workdir, capsys, args, message) -> str:
    """Run the CLI, expect exit 2 and one line matching `message`, and the folder unchanged."""
    before = tree(workdir)
    rc = main([*map(str, args)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("wanrt: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert tree(workdir) == before
    return err


@pytest.fixture(scope="module")
def i2v(checkpoints):
    return checkpoints["i2v", "official"]


@pytest.fixture(scope="module")
def big_image(tmp_path_factory):
    """Wider than any image we accept, yet a small file: a 1-bit PNG."""
    path = tmp_path_factory.mktemp("img") / "wide.png"
    Image.new("1", (MAX_IMAGE_SIDE + 16, 64)).save(path)
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """More pixels than PIL will decode (its decompression-bomb guard), in a small file."""
    path = tmp_path_factory.mktemp("img") / "bomb.png"
    Image.new("1", (15000, 15000)).save(path)
    return path


GENERATE_CASES = [
    (["--device", "foo"], "device must be cpu, cuda or cuda:N"),
    (["--base_seed", str(2**63)], r"base_seed must be an integer in -1\.\.9223372036854775807"),
    (["--base_seed", "-2"], "base_seed must be"),
    (["--frame_num", "100001"], r"frame_num must be an integer in 1\.\.1001"),
    (["--sample_steps", "0"], "sample_steps must be"),
    (["--out", "video.avi"], r"written as \.mp4"),
    (["--out", "."], "is a folder"),
    (["--size", "640*480"], "not supported by"),
    (["--prompt", "x" * 100_001], "prompt must be a string of at most"),
]


@pytest.mark.parametrize("flags,message", GENERATE_CASES)
def test_generate_refuses(workdir, capsys, flags, message):
    refused(workdir, capsys, ["generate", "--prompt", PROMPT, *flags], message)


def test_cuda_without_cuda_is_one_line(workdir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(workdir, capsys, ["generate", "--prompt", PROMPT, "--device", "cuda"], "no CUDA GPU is available")


@pytest.mark.parametrize("image,message", [("big_image", f"sides must be 1..{MAX_IMAGE_SIDE}"),
                                           ("bomb", "cannot read image .*decompression bomb"),
                                           ("keep.txt", "cannot read image"), ("missing.png", "no such file")])
def test_images_are_checked_before_loading(workdir, capsys, request, i2v, image, message):
    path = request.getfixturevalue(image) if image in ("big_image", "bomb") else image
    refused(workdir, capsys, ["generate", "--model", i2v, "--prompt", PROMPT, "--image", path], message)


def test_a_huge_image_is_shrunk_before_it_becomes_floats():
    x = load_image(Image.new("RGB", (4000, 3000), (255, 0, 0)), max_pixels=64 * 48)
    assert x.shape[1] * x.shape[2] <= 4 * 64 * 48 and abs(x.shape[2] / x.shape[1] - 4 / 3) < 0.02
    assert float(x[0].min()) == 1.0 and float(x[1].max()) == -1.0  # still red: shrunk, not cropped or altered
    small = Image.new("RGB", (96, 64), (0, 255, 0))
    assert load_image(small, max_pixels=64 * 48).shape == (3, 64, 96)  # as the official code takes it


def test_request_checks_come_before_the_model_loads(workdir, capsys, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(WanPipeline, "__init__", no_loading)
    for flags, message in GENERATE_CASES:
        refused(workdir, capsys, ["generate", "--prompt", PROMPT, *flags], message)


def test_the_python_api_checks_the_same_way():
    pipe = wanrt.load(device="cpu")
    for kwargs, message in [({"base_seed": 2**63}, "base_seed"), ({"frame_num": 100001}, "frame_num"),
                            ({"sample_guide_scale": float("nan")}, "sample_guide_scale"),
                            ({"sample_solver": "dpm++"}, "sample_solver"), ({"size": "64"}, "width\\*height")]:
        with pytest.raises(ValueError, match=message):
            pipe.generate(PROMPT, progress=False, **kwargs)
    with pytest.raises(ValueError, match="device must be"):
        wanrt.load(device="tpu")


# --- outputs of export and random-checkpoint ---------------------------------------------------------------------------
def test_outputs_that_are_files_are_refused(workdir, capsys, checkpoints):
    refused(workdir, capsys, ["export", "--model", checkpoints["t2v", "official"], "--out", "keep.txt"],
            "exists and is not a folder")
    refused(workdir, capsys, ["random-checkpoint", "--out", "keep.txt"], "exists and is not a folder")
    refused(workdir, capsys, ["random-checkpoint", "--out", "keep.txt/sub"], "cannot create the folder")


def _read_only_mount() -> Path | None:
    for line in Path("/proc/mounts").read_text().splitlines():
        _, where, _, opts, *_ = line.split()
        if "ro" in opts.split(",") and Path(where).is_dir() and where != "/":
            return Path(where)
    return None


def test_a_read_only_output_folder_is_one_line(workdir, capsys):
    ro = _read_only_mount()
    if ro is None:
        pytest.skip("no read-only mount on this machine")
    refused(workdir, capsys, ["generate", "--prompt", PROMPT, "--out", ro / "v.mp4"], "cannot write to")
    refused(workdir, capsys, ["random-checkpoint", "--out", ro / "ckpt"], "cannot (write to|create the folder)")


# --- malformed checkpoints and engines ----------------------------------------------------------------------------------
def _copy(checkpoints, workdir, layout="official"):
    return shutil.copytree(checkpoints["t2v", layout], workdir / "ckpt")


@pytest.mark.parametrize("content,message", [("[1, 2]", "must hold a JSON object"),
                                             ('{"dim": "wide"}', "config.json"),
                                             ('{"wanrt": [1]}', "malformed")])
def test_malformed_config_json(workdir, capsys, checkpoints, content, message):
    root = _copy(checkpoints, workdir)
    (root / "config.json").write_text(content)
    refused(workdir, capsys, ["generate", "--model", root, "--prompt", PROMPT], message)


def test_malformed_diffusers_config(workdir, capsys, checkpoints):
    root = _copy(checkpoints, workdir, "diffusers")
    (root / "transformer" / "config.json").write_text('{"num_layers": 2}')
    refused(workdir, capsys, ["generate", "--model", root, "--prompt", PROMPT], "malformed: KeyError")


def _sharded(checkpoints, workdir, weight_map):
    root = _copy(checkpoints, workdir)
    (root / "diffusion_pytorch_model.safetensors").rename(root / "shard-1.safetensors")
    (root / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


@pytest.mark.parametrize("weight_map,message", [({"a": "../outside.safetensors"}, "only paths inside"),
                                                ({"a": "/etc/passwd"}, "only paths inside"),
                                                ([], "no weight_map")])
def test_index_files_cannot_point_outside_their_folder(workdir, capsys, checkpoints, weight_map, message):
    root = _sharded(checkpoints, workdir, weight_map)
    refused(workdir, capsys, ["generate", "--model", root, "--prompt", PROMPT], message)


@pytest.fixture
def engine_copy(checkpoints, workdir, tmp_path_factory):
    src = export_engine(checkpoints["t2v", "official"], tmp_path_factory.mktemp("e") / "engine", progress=False)
    return shutil.copytree(src, workdir / "engine")


def _edit_manifest(engine: Path, edit) -> None:
    m = json.loads((engine / MANIFEST).read_text())
    edit(m)
    (engine / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["files"].update({"../keep.txt": {"sha256": "0" * 64, "bytes": 4}}), "only paths inside"),
    (lambda m: m["variant"]["dit"].update({"num_layers": 3}), r"missing: .*dit/block_02\.safetensors"),
    (lambda m: m["variant"]["dit"].update({"ffn_dim": 96}), r"DiT weights do not match its config"),
    (lambda m: m["variant"]["dit"].update({"num_layers": 10**9}), "num_layers must be an integer in 1..256"),
    (lambda m: m["files"].update({"dit/resident.safetensors": "x"}), "needs its bytes and sha256"),
])
def test_verify_checks_what_generate_needs(workdir, capsys, engine_copy, edit, message):
    _edit_manifest(engine_copy, edit)
    refused(workdir, capsys, ["export", "--verify", engine_copy], message)
    refused(workdir, capsys, ["generate", "--engine", engine_copy, "--prompt", PROMPT], message)


def test_a_manifest_that_is_not_an_object(workdir, capsys, engine_copy):
    (engine_copy / MANIFEST).write_text("[]")
    refused(workdir, capsys, ["export", "--verify", engine_copy], "must hold a JSON object")


def test_help_does_not_import_torch():
    code = "import sys, wanrt.cli; wanrt.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
