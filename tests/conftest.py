"""Shared fixtures: tiny random-weight checkpoints in both layouts, written once per test session."""
import os
import tempfile

import pytest
import torch

# Without a GPU, Triton kernels run on the CPU through its interpreter, chosen before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The engine trust store (runtime/trust.py) of this test session, never the user's (subprocesses inherit it).
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="wanrt-tests-config-")

from wanrt.testing.random_checkpoint import convert_to_official, write_random_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{(task, layout): path}; each official checkpoint holds exactly the weights of its diffusers twin."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for task in ("t2v", "i2v"):
        diffusers_dir = write_random_checkpoint(root / f"{task}-diffusers", f"tiny-{task}", "diffusers", seed=7)
        out[task, "diffusers"] = diffusers_dir
        out[task, "official"] = convert_to_official(diffusers_dir, root / f"{task}-official")
    return out
