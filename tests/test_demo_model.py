"""The embedded demo model (runtime/demo_model): shipped whole and small, the default of `wanrt generate`, and its
generations pass the semantic check on the CPU for the 20 fixed seeds (issue 8: at least 90%)."""
import pytest

import wanrt
from training.synthetic import evaluate
from wanrt.runtime.pipeline import DEMO_MODEL
from wanrt.cli import main

# Issue 8's target. The shipped model measures 0.95 here: 19 of 20, and the 20th (seed 11, an orange circle on a
# red-to-yellow gradient) fails even on its exact render, where the shape crosses a background of its own colour.
PASS_RATE = 0.90


def test_the_demo_model_is_shipped_small_and_safetensors_only():
    files = [p for p in DEMO_MODEL.rglob("*") if p.is_file()]
    assert {"config.json", "spiece.model", "Wan2.1_VAE.safetensors", "diffusion_pytorch_model.safetensors"} <= {
        p.name for p in files}
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert not [p for p in files if p.suffix in (".pth", ".pt", ".bin")]


def test_generate_without_a_model_uses_the_demo_model(tmp_path, capsys):
    main(["generate", "--prompt", "a red circle moves right on a blue background", "--base_seed", "1", "--device",
          "cpu", "--out", str(tmp_path / "v.mp4")])
    assert "embedded demo model" in capsys.readouterr().out
    assert (tmp_path / "v.mp4").stat().st_size > 0


@pytest.mark.parametrize("options", [{}, {"text_scheme": "int8"}, {"text_scheme": "fp8", "scheme": "int8"},
                                     {"cache": "magcache"}],
                         ids=["defaults", "text int8", "text fp8 + DiT int8", "magcache (16 of 40 passes)"])
def test_the_demo_model_draws_what_the_prompt_asks(options):
    result = evaluate(wanrt.load(device="cpu", **options))
    failures = [(r["seed"], r["prompt"], r["why"]) for r in result["results"] if not r["ok"]]
    assert result["pass_rate"] >= PASS_RATE, failures
