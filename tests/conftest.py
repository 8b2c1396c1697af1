"""Shared fixtures: tiny random-weight checkpoints in both layouts, written once per test session."""
import pytest

from wanrt.export.random_checkpoint import convert_to_official, write_random_checkpoint


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
