"""Engine directories (written by `wanrt export`): read and verify them before any GPU work.

    ENGINE_DIR/
      manifest.json               format version, wanrt version, variant and configs, scheme per tensor group,
                                  attention mode, backend artifacts, GPU capability compiled for, fidelity report,
                                  and the sha256 and size of every other file
      dit/resident.safetensors    everything of the DiT but its blocks
      dit/block_00.safetensors    one shard per block (official names inside the block), quantized per the scheme
      text/resident.safetensors, text/block_00.safetensors ...
      vae/vae.safetensors, clip/clip.safetensors (I2V), tokenizer/

An Engine reads like a Checkpoint (variant, tokenizer_dir and the *_state methods), so the pipeline runs it as it runs
a checkpoint. Opening one checks every file against the manifest (missing, truncated, altered), the format version
and the GPU capability its artifacts were compiled for; each failure is an EngineError naming the file or field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..kernels.dispatch import reference_only
from .checkpoint import CheckpointError, _named_variant, _tuples, check_weights, inside, load_tensors
from .config import VARIANTS, CLIPConfig, DiTConfig, TextConfig, Variant, VAEConfig
from .dit import BlockGraph
from .trust import is_trusted, manifest_digest

FORMAT = "wanrt-engine"
FORMAT_VERSION = 3  # 2: run options recorded, umT5 blocks may be quantized (weight-only); 3: a step cache option
# and calibrated MagCache ratios recorded
MANIFEST = "manifest.json"


class EngineError(CheckpointError):
    """An engine that cannot be used as it is; the message says which file or field and why."""


def sha256(path: Path, chunk: int = 16 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_all(paths: list[Path]) -> list[str]:
    """sha256 of each file, in up to 8 threads (hashlib and file reads release the GIL; each holds a 16 MiB buffer):
    an engine is many GiB, and one core hashes about 1-2 GB/s."""
    with ThreadPoolExecutor(max(1, min(len(paths), os.cpu_count() or 1, 8))) as pool:
        return list(pool.map(sha256, paths))


SAMPLING = ("sample_steps", "sample_shift", "sample_guide_scale", "frame_num")


def variant_to_json(v: Variant) -> dict:
    return {"name": v.name, "dit": dataclasses.asdict(v.dit), "vae": dataclasses.asdict(v.vae),
            "text": dataclasses.asdict(v.text), "clip": None if v.clip is None else dataclasses.asdict(v.clip),
            "sizes": list(v.sizes), "mag_ratios": list(v.mag_ratios), **{k: getattr(v, k) for k in SAMPLING}}


def variant_from_json(d: dict) -> Variant:
    """The variant the engine was exported from, with the engine's quant scheme and attention mode. Its name, sizes
    and sampling defaults come from the manifest (a model of our own, such as the demo model, carries its own); older
    manifests without them get the named variant's, or a custom one's."""
    dit, vae, text = DiTConfig(**_tuples(d["dit"])), VAEConfig(**_tuples(d["vae"])), TextConfig(**_tuples(d["text"]))
    clip = CLIPConfig(**_tuples(d["clip"])) if d.get("clip") else None
    base = VARIANTS.get(d.get("name"))
    if base and (dataclasses.replace(base.dit, quant=dit.quant, attention=dit.attention), base.vae,
                 dataclasses.replace(base.text, quant=text.quant), base.clip) == (dit, vae, text, clip):
        v = dataclasses.replace(base, dit=dit, text=text)
    else:
        v = _named_variant(dit, vae, text, clip)
    if "sizes" in d:
        v = dataclasses.replace(v, name=d["name"], sizes=tuple(d["sizes"]), **{k: d[k] for k in SAMPLING})
    return dataclasses.replace(v, mag_ratios=tuple(d.get("mag_ratios", ())))


def is_engine(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass(frozen=True)
class Engine:
    root: Path
    manifest: dict
    variant: Variant
    trusted: bool = False  # may run its compiled blocks (native code): runtime/trust.py
    layout: str = "engine"

    @property
    def task(self) -> str:
        return self.variant.task

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    def _blocks(self, part: str, num_blocks: int, mmap: bool) -> dict[str, torch.Tensor]:
        """resident.safetensors plus block_XX.safetensors of one part, as one state dict with official names."""
        state = dict(load_tensors(self.root / part / "resident.safetensors", mmap))
        for i in range(num_blocks):
            prefix = "transformer" if part == "clip" else "blocks"
            for name, t in load_tensors(self.root / part / f"block_{i:02d}.safetensors", mmap).items():
                state[f"{prefix}.{i}.{name}"] = t
        return state

    def dit_state(self, mmap: bool = False) -> dict[str, torch.Tensor]:
        return self._blocks("dit", self.variant.dit.num_layers, mmap)

    def text_state(self, mmap: bool = False) -> dict[str, torch.Tensor]:
        return self._blocks("text", self.variant.text.num_layers, mmap)

    def vae_state(self) -> dict[str, torch.Tensor]:
        return load_tensors(self.root / "vae" / "vae.safetensors")

    def clip_state(self, mmap: bool = False) -> dict[str, torch.Tensor]:
        if self.variant.clip is None:
            raise EngineError(f"{self.root} is a {self.task} engine and has no CLIP image encoder")
        return load_tensors(self.root / "clip" / "clip.safetensors", mmap)


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise EngineError(f"{root} is not an engine: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise EngineError(f"{path} must hold a JSON object, not {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise EngineError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EngineError(f"{path}: engine format version {version!r} was written by a newer wanrt (this one reads "
                          f"up to {FORMAT_VERSION}); upgrade wanrt or export the engine again")
    return manifest


def verify_files(root: Path, manifest: dict) -> None:
    """Every file the manifest lists exists with its size and sha256, and no file is there that it does not list."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise EngineError(f"{root / MANIFEST}: no file list")
    for rel, want in files.items():
        path = inside(root, rel, root / MANIFEST)
        if not isinstance(want, dict) or not isinstance(want.get("bytes"), int) or not isinstance(want.get("sha256"), str):
            raise EngineError(f"{root / MANIFEST}: the entry of {rel} needs its bytes and sha256")
        if not path.is_file():
            raise EngineError(f"{path} is missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise EngineError(f"{path} has {size} bytes, the manifest says {want['bytes']}: truncated or replaced")
    for (rel, want), got in zip(files.items(), sha256_all([root / rel for rel in files])):
        if got != want["sha256"]:
            raise EngineError(f"{root / rel} does not match its sha256 in {MANIFEST}: the file was altered or "
                              "corrupted")
    listed = set(files) | {MANIFEST}
    extra = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                   and str(p.relative_to(root)) not in listed)
    if extra:
        raise EngineError(f"{root} has files its manifest does not list: {extra[:5]}")


def check_capability(manifest: dict, capability: tuple[int, int] | None) -> None:
    """Compiled artifacts run only on the GPU capability they were built for (None in the manifest: no artifacts
    tied to one). `capability` is this machine's (None: no GPU)."""
    built = manifest.get("gpu_capability")
    if built is None:
        return
    built = tuple(built)
    if capability is None:
        raise EngineError(f"this engine's compiled artifacts are for a GPU of compute capability sm_{built[0]}{built[1]}"
                          f" and this machine has no GPU; export it again without compiled backends")
    if tuple(capability) != built:
        raise EngineError(f"this engine was compiled for compute capability sm_{built[0]}{built[1]}, this GPU is "
                          f"sm_{capability[0]}{capability[1]}; export it again on this machine")


def is_own_engine(path: str | Path) -> bool:
    """An engine folder as `wanrt export` writes it, judged by content: a manifest of our format listing every file
    there. Only such a folder may be replaced by another export (nothing else in it would be lost)."""
    root = Path(path)
    try:
        manifest = read_manifest(root)
        listed = {str(inside(root, rel, root / MANIFEST).relative_to(root)) for rel in manifest["files"]} | {MANIFEST}
    except (EngineError, KeyError, TypeError, AttributeError):
        return False
    return all(str(p.relative_to(root)) in listed for p in root.rglob("*") if not p.is_dir())


def open_engine(path: str | Path, capability: tuple[int, int] | None | str = "this machine",
                trust_engine: bool = False) -> Engine:
    """Verify an engine directory and return it; `capability` defaults to this machine's GPU (None: no GPU). Its
    compiled blocks run only if this machine exported it or `trust_engine` (runtime/trust.py)."""
    root = Path(path)
    manifest = read_manifest(root)
    if capability == "this machine":
        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    check_capability(manifest, capability)
    verify_files(root, manifest)
    try:
        variant = variant_from_json(manifest["variant"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise EngineError(f"{root / MANIFEST}: bad variant: {type(e).__name__}: {e}") from None
    engine = Engine(root, manifest, variant, trusted=trust_engine or is_trusted(manifest_digest(root / MANIFEST)))
    check_weights(engine)
    return engine


COMPILED_KINDS = ("inductor", "compile")  # the backends that hold a compiled block, in order of preference


def load_block_runner(kind: str, path: Path, cfg: DiTConfig, names: list[str]):
    """A callable (x, e0, context, cos, sin, *weights) -> x for a compiled block: an AOTInductor package
    ("inductor"), or torch.compile's cache artifacts replayed before compiling the same graph again ("compile": the
    compiler finds its Inductor output, kernels and tuning in the cache and generates nothing)."""
    if kind == "inductor":
        return torch._inductor.aoti_load_package(str(path))
    torch.compiler.load_cache_artifacts(path.read_bytes())
    compiled = torch.compile(BlockGraph(cfg, names), dynamic=False, fullgraph=True)

    def run(*args):
        with reference_only():  # the graph was traced from the plain-PyTorch block at export
            return compiled(*args)

    return run


class CompiledBlock:
    """block_forward's stand-in for WanDiT.denoise: an engine's compiled block (weights as inputs, see
    export/inductor_backend.py), used for the token count it was compiled for and whole-sequence plans."""

    def __init__(self, root: Path, entry: dict, kind: str, cfg: DiTConfig):
        self.runner = load_block_runner(kind, inside(root, entry["file"], root / MANIFEST), cfg, entry["weights"])
        self.tokens, self.names = entry["tokens"], entry["weights"]

    def fits(self, tokens: int, chunk: int | None) -> bool:
        return tokens == self.tokens and chunk is None

    def __call__(self, x, e0, context, rope, w, cfg, chunk=None):
        return self.runner(x, e0, context, rope[0], rope[1], *(w[n] for n in self.names))
