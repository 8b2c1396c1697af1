"""Which engines may run native code here. Integrity is not trust: an engine's manifest proves its files are the ones
it lists, not that whoever wrote it meant well. Weights are safetensors and safe to load from anyone; compiled blocks
(an AOTInductor shared object, torch.compile's pickled cache, a TensorRT plan) execute code. They run only for engines
exported on this machine, which `wanrt export` records here by the sha256 of their manifest (which holds the sha256
of every file), or when the user says `--trust-engine` / `trust_engine=True`.

The store is a text file, one manifest sha256 per line followed by the engine's path when it was exported:
$XDG_CONFIG_HOME/wanrt/trusted-engines (default ~/.config/wanrt/trusted-engines).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

NATIVE_BACKENDS = ("inductor", "compile", "tensorrt")  # artifacts that run code when loaded


def store_path() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "wanrt" / "trusted-engines"


def manifest_digest(manifest_path: Path) -> str:
    return hashlib.sha256(manifest_path.read_bytes()).hexdigest()


def is_trusted(digest: str) -> bool:
    path = store_path()
    return path.is_file() and any(line.split()[:1] == [digest] for line in path.read_text().splitlines())


def record_trust(digest: str, root: Path) -> None:
    """Add an engine this machine exported (appending is atomic enough for one short line)."""
    if is_trusted(digest):
        return
    path = store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{digest}  {Path(root).resolve()}\n")
