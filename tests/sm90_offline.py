"""Helpers for the tests that compile kernels for sm_90 without a GPU (Triton's own ptxas and cuobjdump)."""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes, i.e. spills) of the kernel in `cubin`."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))


def run_compiled(code: str) -> None:
    """Run `code` in a child process with the interpreter off (TRITON_INTERPRET=1 replaces every jit function), from
    the tests folder; fail with its stderr."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
