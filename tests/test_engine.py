"""`wanrt export` on the CPU: engines from both checkpoint layouts for every scheme, generation from them, and every
kind of tampering refused with a clear error before any model is built."""
import dataclasses
import json
import os
import shutil
import sys

import numpy as np
import pytest

import wanrt
from wanrt.export.engine import export_engine
from wanrt.quant.formats import SCHEMES
from wanrt.runtime.options import RunOptions
from wanrt.runtime.pipeline import DEMO_MODEL
from wanrt.cli import main
from wanrt.runtime.engine import EngineError, open_engine
from wanrt.runtime.pipeline import WanPipeline

PROMPT = "a red circle moves right on a blue background"
REQUEST = dict(size="32*32", frame_num=5, sample_steps=2, base_seed=3, progress=False)


@pytest.fixture(scope="module")
def engines(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    return {(layout, scheme): export_engine(checkpoints["t2v", layout], root / f"{layout}-{scheme}", scheme, False)
            for layout in ("official", "diffusers") for scheme in SCHEMES}


@pytest.fixture(scope="module")
def reference(checkpoints):
    return wanrt.load(checkpoints["t2v", "official"], device="cpu").generate(PROMPT, **REQUEST).frames


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_bf16_engine_generates_what_its_checkpoint_does(engines, checkpoints, layout):
    want = wanrt.load(checkpoints["t2v", layout], device="cpu").generate(PROMPT, **REQUEST).frames
    got = wanrt.load(engines[layout, "bf16"], device="cpu").generate(PROMPT, **REQUEST).frames
    assert np.array_equal(got, want)


@pytest.mark.parametrize("layout", ["official", "diffusers"])
@pytest.mark.parametrize("scheme", SCHEMES[1:])
def test_quantized_engines_record_their_error_and_generate_close_to_bf16(engines, reference, scheme, layout):
    engine = open_engine(engines[layout, scheme])
    report = engine.manifest["fidelity"]
    bound = {"fp8": 4e-2, "nf4": 0.15}.get(scheme, 1e-2)  # nf4: 4-bit codes, ~9% of a Gaussian weight
    assert report["scheme"] == scheme and 0 < report["max"] < bound
    assert engine.variant.dit.quant == scheme and engine.variant.name == "tiny-t2v"
    video = wanrt.load(engines[layout, scheme], device="cpu").generate(PROMPT, **REQUEST).frames
    err = np.abs(video.astype(float) - reference).mean() / 255
    print(f"{scheme}: per-linear error up to {report['max']:.4f}, mean frame error {err:.4f} of full scale")
    assert video.shape == reference.shape and err < 0.05


def test_engine_keeps_the_models_sizes_and_sampling_defaults(tmp_path):
    """The demo model names its sizes, steps, shift, guidance and frame count in its config.json (no named variant
    has its configs); its engines must generate with the same defaults (they once fell back to Wan's 50 steps,
    shift 5, guidance 5 and 81 frames)."""
    want = wanrt.load(DEMO_MODEL, device="cpu").ckpt.variant
    assert (want.sample_steps, want.sample_guide_scale, want.frame_num) != (50, 5.0, 81)
    got = open_engine(export_engine(DEMO_MODEL, tmp_path / "engine", "fp8", progress=False)).variant
    assert got == dataclasses.replace(want, dit=dataclasses.replace(want.dit, quant="fp8"))


def test_quantized_shards_are_smaller(engines):
    def block_bytes(scheme):
        return engines["official", scheme].joinpath("dit", "block_00.safetensors").stat().st_size
    assert block_bytes("fp8") < block_bytes("bf16") and block_bytes("int8") == block_bytes("w8a16")


def test_generate_cli_takes_an_engine(engines, tmp_path):
    out = tmp_path / "v.mp4"
    assert main(["generate", "--engine", str(engines["official", "bf16"]), "--prompt", PROMPT, "--size", "32*32",
                 "--frame_num", "5", "--sample_steps", "2", "--out", str(out)]) == 0
    assert out.is_file()


# --- tampering: each a clear error from open_engine, before any model is built ----------------------------------

@pytest.fixture
def engine_copy(engines, tmp_path):
    dst = tmp_path / "engine"
    shutil.copytree(engines["official", "bf16"], dst)
    return dst


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(root, **changes):
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("tamper, message", [
    (lambda r: _flip_byte(r / "dit" / "block_01.safetensors"), "does not match its sha256"),
    (lambda r: (r / "text" / "block_00.safetensors").write_bytes(
        (r / "text" / "block_00.safetensors").read_bytes()[:-100]), "truncated"),
    (lambda r: (r / "vae" / "vae.safetensors").unlink(), "is missing"),
    (lambda r: (r / "manifest.json").unlink(), "not an engine"),
    (lambda r: _edit_manifest(r, format_version=99), "newer wanrt"),
    (lambda r: _edit_manifest(r, gpu_capability=[12, 0]), "compiled for compute capability sm_120"),
    (lambda r: (r / "dit" / "extra.bin").write_bytes(b"x"), "does not list"),
])
def test_tampered_engines_are_refused(engine_copy, tamper, message):
    tamper(engine_copy)
    with pytest.raises(EngineError, match=message):
        open_engine(engine_copy, capability=(9, 0))


def test_a_format_2_engine_still_opens(engine_copy):
    """Engines written before step caching: no cache option, no MagCache ratios, no LoRA side rank in the DiT config."""
    m = json.loads((engine_copy / "manifest.json").read_text())
    m["variant"].pop("mag_ratios")
    m["variant"]["dit"].pop("lora_rank")
    m["options"].pop("cache")
    _edit_manifest(engine_copy, format_version=2, variant=m["variant"], options=m["options"])
    pipe = wanrt.load(engine_copy, device="cpu")
    assert pipe.cache is None and pipe.variant.mag_ratios == () and pipe.variant.dit.lora_rank == 0


def test_sha256_all_hashes_each_file_in_order(tmp_path):
    import hashlib

    from wanrt.runtime.engine import sha256_all

    datas = [os.urandom(n) for n in (0, 1, 3 * 2**20 + 5, 1000)]
    paths = []
    for i, data in enumerate(datas):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(data)
    assert sha256_all(paths) == [hashlib.sha256(d).hexdigest() for d in datas]


def test_engine_for_a_gpu_on_a_machine_without_one(engine_copy):
    _edit_manifest(engine_copy, gpu_capability=[9, 0])
    with pytest.raises(EngineError, match="no GPU"):
        open_engine(engine_copy, capability=None)
    assert open_engine(engine_copy, capability=(9, 0)).variant.name == "tiny-t2v"  # hashes still hold


def test_verify_cli(engine_copy, capsys):
    assert main(["export", "--verify", str(engine_copy)]) == 0
    assert "ok (" in capsys.readouterr().out
    _flip_byte(engine_copy / "dit" / "resident.safetensors")
    assert main(["export", "--verify", str(engine_copy)]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and len(err.strip().splitlines()) == 1


def test_export_is_atomic(checkpoints, tmp_path, monkeypatch):
    import wanrt.export.engine as E

    calls = []

    def failing_save(state, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(state, path)
    real_save = E._save
    monkeypatch.setattr(E, "_save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_engine(checkpoints["t2v", "official"], tmp_path / "engine", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the engine nor its temporary folder is left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    monkeypatch.setattr(E, "_save", real_save)
    with pytest.raises(ValueError, match="not written by wanrt"):
        export_engine(checkpoints["t2v", "official"], tmp_path / "notes", progress=False)


# --- compiled backends ---------------------------------------------------------------------------------------------

def test_onnx_backend_is_validated_with_onnxruntime_and_hashed(checkpoints, tmp_path):
    pytest.importorskip("onnxruntime")
    out = export_engine(checkpoints["t2v", "official"], tmp_path / "e", backends=("onnx",), latents=(2, 4, 6),
                        progress=False)
    engine = open_engine(out)
    onnx = engine.manifest["backends"]["onnx"]
    assert onnx["tokens"] == 2 * 2 * 3 and onnx["rel_err_vs_torch"] <= 1e-3
    assert onnx["file"] in engine.manifest["files"] and engine.manifest["gpu_capability"] is None


@pytest.mark.parametrize("scheme", ["fp8", "int8", "w8a16"])
def test_quantized_onnx_graphs_are_qdq_and_validated(checkpoints, tmp_path, scheme):
    """The quantized block's graph: its weight inputs stay fp8/int8, DequantizeLinear reads them (and w8a8 schemes
    quantize activations with QuantizeLinear); onnxruntime matches the same Q/DQ arithmetic in PyTorch, and the
    distance from the runtime's quantized block is recorded."""
    onnx = pytest.importorskip("onnx")
    out = export_engine(checkpoints["t2v", "official"], tmp_path / "e", scheme, backends=("onnx",),
                        latents=(2, 4, 6), progress=False)
    entry = open_engine(out).manifest["backends"]["onnx"]
    assert entry["rel_err_vs_torch"] <= 1e-3 and 0 < entry["rel_err_vs_runtime_block"] < 0.05
    graph = onnx.load(out / entry["file"]).graph
    ops = [n.op_type for n in graph.node]
    # 10 linears (q k v o of both attentions, the FFN's two) read 7 distinct activations: q, k and v of the
    # self-attention share one, k and v of the cross-attention the context; each is quantized once
    activations = 7 if scheme != "w8a16" else 0
    assert ops.count("QuantizeLinear") == activations and ops.count("DequantizeLinear") == 10 + activations
    weight_type = {"fp8": onnx.TensorProto.FLOAT8E4M3FN}.get(scheme, onnx.TensorProto.INT8)
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert inputs["ffn.0.weight"] == weight_type and inputs["ffn.0.weight_scale"] == onnx.TensorProto.FLOAT


def test_backend_requests_that_cannot_be_met_fail_before_writing(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="bf16"):
        export_engine(checkpoints["t2v", "official"], tmp_path / "q", "fp8", backends=("compile",), progress=False)
    with pytest.raises(ValueError, match="unknown backends"):
        export_engine(checkpoints["t2v", "official"], tmp_path / "u", backends=("inductr",), progress=False)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="TensorRT"):
            export_engine(checkpoints["t2v", "official"], tmp_path / "t", backends=("tensorrt",), progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["inductor", "compile"])
def test_compiled_engine_runs_its_compiled_block(checkpoints, reference, tmp_path, kind):
    """The compiled block (an AOTInductor package, or torch.compile's cache; compiled at export, here for the CPU)
    replaces the eager block when the request has its token count and the plan keeps all tokens together; the frames
    stay those of the checkpoint. A fresh process loaded it at export, and the cache form compiled nothing there."""
    out = export_engine(checkpoints["t2v", "official"], tmp_path / "e", backends=(kind,), latents=(2, 4, 4),
                        progress=False)
    entry = open_engine(out).manifest["backends"][kind]
    assert entry["device"] == "cpu" and entry["rel_err_vs_eager"] <= 1e-4
    if kind == "compile":
        assert entry["fresh_process"]["cache_hits"] >= 1 and entry["fresh_process"]["compiled"] == 0
    pipe = wanrt.load(out, device="cpu")
    calls = []
    block = pipe.dit.compiled_block
    pipe.dit.compiled_block = type("Counting", (), {"fits": block.fits, "__call__": lambda self, *a: (
        calls.append(1), block(*a))[1]})()
    frames = pipe.generate(PROMPT, **REQUEST).frames
    assert len(calls) == 2 * REQUEST["sample_steps"] * pipe.variant.dit.num_layers  # every block, both CFG passes
    diff = np.abs(frames.astype(int) - reference)
    assert diff.max() <= 1 and diff.mean() < 1e-2
    # with another attention mode than it was compiled for, the eager block runs
    other = WanPipeline(open_engine(out), device="cpu", options=RunOptions(attention="int8"))
    assert block is not None and other.dit.compiled_block is None


def test_inductor_export_survives_a_crashing_package_loader(checkpoints, tmp_path, monkeypatch):
    """AOTInductor's loader can segfault (it does on an H100 with torch 2.11 + CUDA 13.0): the package is validated in
    a fresh process, so export fails with a clear error naming the signal, and no engine is written."""
    from wanrt.export import inductor_backend

    monkeypatch.setattr(inductor_backend, "child_command", lambda *a: [
        sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    with pytest.raises(RuntimeError, match="killed by SIGSEGV.*Export without"):
        export_engine(checkpoints["t2v", "official"], tmp_path / "e", backends=("inductor",), latents=(2, 4, 4),
                      progress=False)
    assert list(tmp_path.iterdir()) == []
