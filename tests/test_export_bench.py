"""The export benchmark's script on the CPU with the tiny variant (the real run is on a GPU at full size): every
scheme is exported and sized, and the compiled block (torch.compile's cache form) is compared with the eager ones on
the same inputs."""
import json
import sys

from experiments import export_bench
from wanrt.quant.formats import SCHEMES


def test_export_bench_runs_on_the_tiny_variant(tmp_path, monkeypatch):
    out = tmp_path / "report"
    monkeypatch.setattr(sys, "argv", ["export_bench", "--device", "cpu", "--variant", "tiny-t2v", "--work",
                                      str(tmp_path / "work"), "--out", str(out), "--only", "export,block",
                                      "--backend", "compile"])
    export_bench.main()
    report = json.loads(out.with_suffix(".json").read_text())
    assert "errors" not in report
    export = report["export"]
    assert set(SCHEMES) | {"bf16_compile"} <= set(export)
    assert export["fp8"]["dit_bytes"] < export["bf16"]["dit_bytes"] and export["fp8"]["fidelity_max_rel_err"] > 0
    block = report["block"]
    assert block["compiled"]["rel_err_vs_eager_ours"] < 1e-4 and block["compiled_over_eager_ours"] > 0
    assert "| compiled |" in out.with_suffix(".md").read_text()
