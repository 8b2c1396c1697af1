"""`wanrt bench` end to end on the CPU with the tiny config: every phase measured, peers compared, a valid report."""
import json
import re

import pytest

from wanrt.bench.link import LinkEmulator
from wanrt.bench.report import validate
from wanrt.cli import main, parse_budgets

pytest.importorskip("diffusers")


def test_parse_budgets():
    assert parse_budgets("1GiB, 512MiB,resident") == [2**30, 2**29, None]


def test_bench_tiny_cpu(tmp_path):
    out = tmp_path / "bench"
    rc = main(["bench", "--variant", "tiny-t2v", "--size", "64*64", "--frame_num", "5", "--steps", "2",
               "--budgets", "resident,119MiB,1MiB", "--runs", "2", "--warmup", "0", "--device", "cpu", "--out", str(out),
               "--no-plots"])
    assert rc == 0
    report = json.loads(out.with_suffix(".json").read_text())
    validate(report)
    assert out.with_suffix(".md").read_text().count("|") > 10
    rows = {(r["engine"], r["setting"]): r for r in report["rows"]}
    ours = rows["wanrt", "resident"]
    assert ours["error"] is None and set(ours["phases"]) == {"text", "denoise_step", "decode", "generate"}
    for phase in ours["phases"].values():
        assert 0 < phase["min_ms"] <= phase["median_ms"] <= phase["max_ms"] and phase["host_peak_gib"] > 0
    small = rows["wanrt", "119 MiB"]  # near the smallest budget the planner accepts: every phase planned within it
    assert small["error"] is None and set(small["phases"]) == set(ours["phases"])
    assert all(p["predicted_gib"] <= 119 / 1024 for p in small["phases"].values() if "predicted_gib" in p)
    needed = re.search(r"--vram-budget (\d+)MiB", rows["wanrt", "1 MiB"]["error"])  # refused, naming what fits
    assert needed and int(needed[1]) <= 119
    # the peers ran on the same weights and inputs, so they agree with wanrt (fp32 on the CPU)
    dit = rows["diffusers", "DiT resident"]["phases"]["denoise_step"]
    assert dit["rel_err_vs_wanrt"] < 1e-3
    for setting in ("VAE untiled", "VAE tiled"):
        assert rows["diffusers", setting]["phases"]["decode"]["psnr_vs_wanrt_db"] > 40


def test_link_padding_makes_copies_take_bytes_over_rate():
    link = LinkEmulator(2.0, "cpu")
    link.native = 8e9  # as if measured: a 2 GB/s link pads a 8 GB/s copy by 3/4 of the emulated time
    assert link.padding(10**9) == pytest.approx(0.5 - 0.125)
    link.native = 1e9  # the real link is already slower: nothing to add
    assert link.padding(10**9) == 0


def test_bench_an_engine(checkpoints, tmp_path):
    """--model takes an engine: its quantized scheme is what gets measured."""
    from wanrt.export.engine import export_engine

    engine = export_engine(checkpoints["t2v", "official"], tmp_path / "engine", "int8", progress=False)
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(engine), "--size", "32*32", "--frame_num", "5", "--steps", "1",
                 "--budgets", "resident", "--runs", "1", "--warmup", "0", "--device", "cpu", "--out", str(out),
                 "--no-plots", "--no-peers"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    validate(report)
    assert report["rows"][0]["scheme"] == "int8" and report["rows"][0]["error"] is None
