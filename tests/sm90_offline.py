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


def local_memory_in_loops(sass: str) -> int:
    """Spill traffic (LDL/STL) inside the key-block loops of `sass`: the innermost spans from a label to a backward
    branch to it that hold wgmmas (GMMA) and no EXIT (which leaves out the retry blocks that ptxas places after the
    exit and that branch back into a loop). A spill there costs on every key block, elsewhere once per program."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\w+):$", line.strip()))}
    spans = set()
    for end, line in enumerate(lines):
        m = re.search(r"\bBRA (\w+);", line)
        start = labels.get(m.group(1), end) if m else end
        body = lines[start:end]
        if any("GMMA" in line for line in body) and not any("EXIT" in line for line in body):
            spans.add((start, end))
    loops = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    return sum(re.search(r"\b(LDL|STL)\b", line) is not None for a, b in loops for line in lines[a:b])


def run_compiled(code: str) -> None:
    """Run `code` in a child process with the interpreter off (TRITON_INTERPRET=1 replaces every jit function), from
    the tests folder; fail with its stderr."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
