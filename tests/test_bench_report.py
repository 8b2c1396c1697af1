"""The `wanrt bench` report tools: schema checks naming the bad field, the markdown, the README block, the plots."""
from __future__ import annotations

import json
import re

import pytest

from wanrt.bench.report import main, markdown, plots, readme_table, update_readme, validate

GiB = 2**30


def phase(median_ms: float, reserved: float, **extra) -> dict:
    """A measured phase with a plausible spread and memory peaks around `reserved` GiB."""
    return {"median_ms": median_ms, "min_ms": round(median_ms * 0.98, 2), "max_ms": round(median_ms * 1.03, 2),
            "runs": 3, "max_reserved_gib": reserved, "max_allocated_gib": round(reserved * 0.9, 3),
            "device_peak_gib": round(reserved + 0.5, 3), "host_peak_gib": 21.4, **extra}


def wanrt_row(setting: str, budget: float | None, step_ms: float, streamed_gib: float) -> dict:
    reserved = budget * 0.95 if budget else 9.8
    roofline = {"flops": 1.1e15, "compute_ms": 1650.0, "streamed_bytes": int(streamed_gib * GiB),
                "link_ms": streamed_gib * GiB / 25e9 * 1e3}
    return {"engine": "wanrt", "setting": setting, "budget_gib": budget, "scheme": "bf16", "attention": "sdpa",
            "backend": "eager", "error": None, "phases": {
                "text": phase(410.0 if budget else 120.0, min(reserved, 0.9)),
                "denoise_step": phase(step_ms, reserved, roofline=roofline, predicted_gib=reserved * 0.97,
                                      plan=f"{setting}: streamed blocks"),
                "decode": phase(8200.0, reserved, plan="tiled 240x240, 2 slots" if budget else "untiled"),
                "generate": phase(step_ms * 4 + 9000.0, reserved)}}


def peer_row(engine: str, setting: str, step_ms: float, decode_ms: float, rel_err: float) -> dict:
    return {"engine": engine, "setting": setting, "budget_gib": None, "scheme": "bf16", "attention": "sdpa",
            "backend": "eager", "error": None,
            "phases": {"denoise_step": phase(step_ms, 9.9, rel_err_vs_wanrt=rel_err),
                       "decode": phase(decode_ms, 24.1, rel_err_vs_wanrt=0.004, psnr_vs_wanrt_db=41.26)}}


@pytest.fixture
def report() -> dict:
    """An H100 run of t2v-1.3B at 480p: wanrt at 1, 2, 4 GiB and resident, a refused budget, two diffusers rows."""
    return {
        "schema": "wanrt-bench/1",
        "command": "wanrt bench --variant t2v-1.3B --budgets 0.5,1,2,4,resident --peers diffusers --link-gbps 16",
        "started": "2026-05-09 10:00 UTC",
        "interrupted": False,
        "machine": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1, "capability": [9, 0],
                    "driver": "570.124.06", "torch": "2.7.1+cu126", "triton": "3.3.1", "python": "3.11.7",
                    "cpu": "AMD EPYC 9354 32-Core Processor"},
        "config": {"variant": "t2v-1.3B", "size": "832*480", "frame_num": 81, "latents": [21, 60, 104],
                   "steps_whole": 4, "runs": 3, "warmup": 1, "link_gbps": 16, "prompt": "a red circle moves right"},
        "rows": [
            wanrt_row("1 GiB", 1, 2890.0, 2.6),
            wanrt_row("2 GiB", 2.0, 2610.0, 2.0),
            wanrt_row("4 GiB", 4.0, 2200.0, 0.7),
            wanrt_row("resident", None, 2080.0, 0.0),
            {"engine": "wanrt", "setting": "0.5 GiB", "budget_gib": 0.5, "scheme": "bf16", "attention": "sdpa",
             "backend": "eager", "phases": {},
             "error": "PlanError: 0.5 GiB cannot hold the decode | the smallest plan needs 0.81 GiB"},
            peer_row("diffusers", "resident", 2150.0, 7400.0, 0.015),
            peer_row("diffusers", "group offload (block, stream)", 3300.0, 7450.0, 0.015),
        ],
        "link": {"gbps": 16.0, "block_bytes": 100 * 2**20, "blocks_measured": 30, "expected_ms": 6.55,
                 "measured_ms": 6.9, "ratio": 1.053},
        "peaks": {"matmul_tflops": 667.0, "hbm_gbps": 2900.0, "h2d_gbps": 25.0},
    }


def test_validate_accepts_a_realistic_report_with_ints_for_floats_and_extra_keys(report):
    report["rows"][0]["phases"]["decode"].update(median_ms=8200, min_ms=8000, max_ms=8400)  # ints are numbers
    report["rows"][0]["new_field_of_a_later_writer"] = {"anything": 1}
    validate(report)


DELETE = object()


def _set(path: str, value):
    """A corruption: set the field at a path like "rows[0].phases.text.min_ms" (or delete it: value DELETE)."""
    def corrupt(report):
        *parents, last = re.findall(r"\w+|\[\d+\]", path)
        obj = report
        for key in parents:
            obj = obj[int(key[1:-1])] if key.startswith("[") else obj[key]
        if value is DELETE:
            del obj[last]
        else:
            obj[last] = value
    return corrupt


@pytest.mark.parametrize("corrupt, where", [
    (_set("schema", "wanrt-bench/2"), "schema"),
    (_set("machine.torch", DELETE), "machine.torch"),
    (_set("rows[1].phases.decode.median_ms", -1.0), "rows[1].phases.decode.median_ms"),
    (_set("rows[0].phases.text.min_ms", 500.0), "rows[0].phases.text.min_ms"),
    (_set("rows[0].phases.text.max_ms", 400.0), "rows[0].phases.text.max_ms"),
    (_set("rows[6].engine", "comfyui"), "rows[6].engine"),
    (_set("rows[3].phases.vae", {}), "rows[3].phases.vae"),
    (_set("rows[2].phases.denoise_step.runs", 0), "rows[2].phases.denoise_step.runs"),
    (_set("rows[3].phases.generate.max_reserved_gib", True), "rows[3].phases.generate.max_reserved_gib"),
    (_set("config.runs", True), "config.runs"),
    (_set("interrupted", 0), "interrupted"),
    (_set("config.latents", [21, 60]), "config.latents"),
    (_set("rows[0].phases.denoise_step.roofline.streamed_bytes", 1.5), "rows[0].phases.denoise_step.roofline"),
    (_set("rows[4].error", None), "rows[4].phases"),
    (_set("started", "yesterday"), "started"),
], ids=["schema", "missing-machine-key", "negative-median", "min-above-median", "max-below-median",
        "unknown-engine", "unknown-phase", "runs-0", "bool-for-number", "bool-for-int", "int-for-bool",
        "short-latents", "float-for-int", "empty-phases-without-error", "started-format"])
def test_validate_names_the_bad_field(report, corrupt, where):
    corrupt(report)
    with pytest.raises(ValueError, match="^" + re.escape(where)):
        validate(report)


def test_validate_message_shows_the_path_and_the_bad_value(report):
    report["rows"][2]["phases"]["decode"]["median_ms"] = "x"
    with pytest.raises(ValueError) as e:
        validate(report)
    assert str(e.value) == "rows[2].phases.decode.median_ms: expected a number, got 'x'"


def test_markdown_has_every_row_missing_phases_roofline_and_link(report):
    text = markdown(report)
    assert text.startswith("# wanrt bench: NVIDIA H100 80GB HBM3\n")
    assert "torch 2.7.1+cu126, triton 3.3.1, driver 570.124.06" in text
    assert "t2v-1.3B, 832*480, 81 frames (latents 21×60×104)" in text and "emulated at 16 GB/s" in text
    table = [line for line in text.splitlines() if line.startswith("| wanrt |") or line.startswith("| diffusers |")]
    assert len(table) == len(report["rows"])
    for line, row in zip(table, report["rows"]):
        assert f"| {row['engine']} | {row['setting']} |" in line
    assert "| wanrt | 1 GiB | 410 | 2,890 | 8,200 | 20.6 | 0.95 |" in table[0]
    offload = table[6]
    assert offload.count("—") == 2  # no text phase, no generate phase
    assert "step 1.5e-02; decode 4.0e-03 / 41.3 dB" in offload
    assert "error: PlanError: 0.5 GiB cannot hold the decode \\| the smallest" in table[4]  # the pipe is escaped
    assert "tiled 240x240, 2 slots" in table[0]
    assert "## Roofline (wanrt)" in text
    assert "| resident | denoise step | 2,080 | 1,650 | 0.00 | 0.00 | 1.26 |" in text
    assert "at 16 GB/s a block of 100.0 MiB took 6.90 ms vs 6.55 ms expected (ratio 1.05)" in text
    assert "nterrupted" not in text


def test_markdown_says_interrupted_and_names_the_cpu(report):
    report.update(interrupted=True, rows=report["rows"][:2], link=None)
    report["machine"].update(device="cpu", gpu=None, memory_gib=None, capability=None, driver=None, triton=None)
    for row in report["rows"]:
        for measured in row["phases"].values():
            measured.pop("roofline", None)
    text = markdown(report, ["bench_cpu_latency.png"])
    assert text.startswith("# wanrt bench: CPU\n")
    assert "**Interrupted**" in text and "no triton" in text
    assert "Roofline" not in text and "Link emulation" not in text
    assert "- ![bench_cpu_latency](bench_cpu_latency.png)" in text


README = "# wanrt\n\nintro\n\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\n## Later\n\ntext\n"


def test_update_readme_replaces_only_the_marked_block(report, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    update_readme(report, readme, "bench/results/bench_h100.json")
    text = readme.read_text()
    before, rest = text.split("<!-- bench:start -->\n")
    block, after = rest.split("<!-- bench:end -->\n")
    assert before == "# wanrt\n\nintro\n\n" and after == "\n## Later\n\ntext\n"
    assert "old table" not in block and readme_table(report) in block
    assert "[`bench/results/bench_h100.json`](bench/results/bench_h100.json)" in block
    assert "| wanrt, 0.5 GiB (error, see report) | — | — | — | — |" in block
    update_readme(report, readme, "bench/results/bench_h100.json")
    assert readme.read_text() == text  # idempotent
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temporary file left


@pytest.mark.parametrize("text", ["# no markers\n", "<!-- bench:start -->\nonly a start\n",
                                  "<!-- bench:end -->\n<!-- bench:start -->\n"])
def test_update_readme_refuses_without_markers(report, tmp_path, text):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(ValueError, match="bench:start"):
        update_readme(report, readme, "r.json")
    assert readme.read_text() == text


def test_plots_writes_two_pngs(report, tmp_path):
    pytest.importorskip("matplotlib")
    paths = plots(report, tmp_path / "out" / "bench_h100")
    assert [p.name for p in paths] == ["bench_h100_latency.png", "bench_h100_memory.png"]
    for path in paths:
        assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_without_matplotlib_say_so(report, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # makes `import matplotlib...` fail
    assert plots(report, tmp_path / "bench") == []
    assert "pip install matplotlib" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_main_writes_markdown_and_readme(report, tmp_path):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    source = results / "bench_h100.json"
    source.write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    main([str(source), "--readme", str(readme)])
    assert (results / "bench_h100.md").read_text() == markdown(report)
    assert "(bench/results/bench_h100.json)" in readme.read_text()


def test_main_refuses_an_invalid_report(report, tmp_path):
    report["rows"][0]["engine"] = "comfyui"
    source = tmp_path / "bad.json"
    source.write_text(json.dumps(report))
    with pytest.raises(SystemExit, match=r"rows\[0\]\.engine"):
        main([str(source)])
    assert not source.with_suffix(".md").exists()
