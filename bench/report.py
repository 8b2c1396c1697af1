"""Render a `wanrt bench` report (schema "wanrt-bench/1"): check it, write its markdown, plot it, and keep the
README's benchmark table in step with it.

    python -m wanrt.bench.report bench/results/bench_h100.json --plots --readme README.md

The report itself is measured by `wanrt bench` (wanrt.bench.matrix). This module only reads it, so it needs neither
torch nor a GPU, and matplotlib only for the plots.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import textwrap
from pathlib import Path

SCHEMA = "wanrt-bench/1"
ENGINES = ("wanrt", "diffusers", "transformers")
PHASES = ("text", "denoise_step", "decode", "generate")  # also the order of table columns and legends
DEVICES = ("cuda", "cpu")
PHASE_NAMES = {"text": "text", "denoise_step": "denoise step", "decode": "decode", "generate": "generate"}
SHORT_PHASE_NAMES = {"text": "text", "denoise_step": "step", "decode": "decode", "generate": "gen"}
PHASE_COLORS = {"text": "tab:green", "denoise_step": "tab:blue", "decode": "tab:orange", "generate": "tab:purple"}
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
MISSING = "—"
MiB = 2**20
STARTED = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC")
SIZE = re.compile(r"\d+\*\d+")

# Field specs, name -> kind; a trailing "?" admits null. "number" is an int or a float (never a bool).
TOP_FIELDS = {"schema": "str", "command": "str", "started": "str", "interrupted": "bool", "machine": "object",
              "config": "object", "rows": "list", "link": "object?", "peaks": "object?"}
MACHINE_FIELDS = {"device": "str", "gpu": "str?", "memory_gib": "number?", "capability": "list?", "driver": "str?",
                  "torch": "str", "triton": "str?", "python": "str", "cpu": "str"}
CONFIG_FIELDS = {"variant": "str", "size": "str", "frame_num": "int", "latents": "list", "steps_whole": "int",
                 "runs": "int", "warmup": "int", "link_gbps": "number?", "prompt": "str"}
ROW_FIELDS = {"engine": "str", "setting": "str", "budget_gib": "number?", "scheme": "str", "attention": "str",
              "backend": "str", "phases": "object", "error": "str?"}
PHASE_FIELDS = {"median_ms": "number", "min_ms": "number", "max_ms": "number", "runs": "int",
                "max_reserved_gib": "number?", "max_allocated_gib": "number?", "device_peak_gib": "number?",
                "host_peak_gib": "number?"}
PHASE_OPTIONAL_FIELDS = {"predicted_gib": "number", "plan": "str", "rel_err_vs_wanrt": "number",
                         "psnr_vs_wanrt_db": "number", "roofline": "object"}
PHASE_NON_NEGATIVE = ("median_ms", "min_ms", "max_ms", "max_reserved_gib", "max_allocated_gib", "device_peak_gib",
                      "host_peak_gib", "predicted_gib", "rel_err_vs_wanrt")
ROOFLINE_FIELDS = {"flops": "number", "compute_ms": "number", "streamed_bytes": "int", "link_ms": "number"}
LINK_FIELDS = {"gbps": "number", "block_bytes": "int", "blocks_measured": "int", "expected_ms": "number",
               "measured_ms": "number", "ratio": "number"}
PEAKS_FIELDS = {"matmul_tflops": "number", "hbm_gbps": "number", "h2d_gbps": "number"}
KINDS = {"number": ((int, float), "a number"), "int": (int, "an integer"), "str": (str, "a string"),
         "bool": (bool, "a bool"), "object": (dict, "an object"), "list": (list, "a list")}


# ---- validation ----

def validate(report: dict) -> None:
    """Check a report against schema wanrt-bench/1; raise ValueError naming the path of the first bad field.

    Extra keys anywhere are allowed (newer writers may add some); the schema string itself must match exactly."""
    _check_kind(report, "object", "report")
    if "schema" not in report:
        _fail("schema", "missing")
    if report["schema"] != SCHEMA:
        _fail("schema", f"expected {SCHEMA!r}, got {_show(report['schema'])}")
    _check_fields(report, TOP_FIELDS, "")
    if not STARTED.fullmatch(report["started"]):
        _fail("started", f"expected 'YYYY-mm-dd HH:MM UTC', got {_show(report['started'])}")
    _check_machine(report["machine"], "machine")
    _check_config(report["config"], "config")
    for i, row in enumerate(report["rows"]):
        _check_row(row, f"rows[{i}]")
    if report["link"] is not None:
        _check_fields(report["link"], LINK_FIELDS, "link")
        _check_non_negative(report["link"], LINK_FIELDS, "link")
        _check_positive(report["link"], "gbps", "link")
    if report["peaks"] is not None:
        _check_fields(report["peaks"], PEAKS_FIELDS, "peaks")
        _check_non_negative(report["peaks"], PEAKS_FIELDS, "peaks")


def _check_machine(machine: dict, path: str) -> None:
    _check_fields(machine, MACHINE_FIELDS, path)
    _check_choice(machine, "device", DEVICES, path)
    _check_non_negative(machine, ("memory_gib",), path)
    if machine["capability"] is not None:
        _check_int_list(machine["capability"], 2, 0, _at(path, "capability"))


def _check_config(config: dict, path: str) -> None:
    _check_fields(config, CONFIG_FIELDS, path)
    if not SIZE.fullmatch(config["size"]):
        _fail(_at(path, "size"), f"expected 'WIDTH*HEIGHT', got {_show(config['size'])}")
    _check_int_list(config["latents"], 3, 1, _at(path, "latents"))
    for key, low in (("frame_num", 1), ("steps_whole", 0), ("runs", 1), ("warmup", 0)):
        _check_at_least(config, key, low, path)
    if config["link_gbps"] is not None:
        _check_positive(config, "link_gbps", path)


def _check_row(row: dict, path: str) -> None:
    _check_fields(row, ROW_FIELDS, path)
    _check_choice(row, "engine", ENGINES, path)
    if row["budget_gib"] is not None:  # null is the resident row; a cap of zero would be a writer's bug
        _check_positive(row, "budget_gib", path)
    for name, phase in row["phases"].items():
        where = _at(_at(path, "phases"), name)
        if name not in PHASES:
            _fail(where, f"unknown phase, expected one of {', '.join(PHASES)}")
        _check_phase(phase, where)
    if not row["phases"] and row["error"] is None:
        _fail(_at(path, "phases"), "empty, and no error says why")


def _check_phase(phase: dict, path: str) -> None:
    _check_fields(phase, PHASE_FIELDS, path, PHASE_OPTIONAL_FIELDS)
    _check_non_negative(phase, PHASE_NON_NEGATIVE, path)
    _check_at_least(phase, "runs", 1, path)
    if phase["min_ms"] > phase["median_ms"]:
        _fail(_at(path, "min_ms"), f"{phase['min_ms']} is above median_ms {phase['median_ms']}")
    if phase["median_ms"] > phase["max_ms"]:
        _fail(_at(path, "max_ms"), f"{phase['max_ms']} is below median_ms {phase['median_ms']}")
    if "roofline" in phase:
        roofline_path = _at(path, "roofline")
        _check_fields(phase["roofline"], ROOFLINE_FIELDS, roofline_path)
        _check_non_negative(phase["roofline"], ROOFLINE_FIELDS, roofline_path)


def _check_fields(obj, required: dict, path: str, optional: dict | None = None) -> None:
    """Each required key is present and of its kind; each optional key, where present, too."""
    _check_kind(obj, "object", path or "report")
    for key, kind in required.items():
        if key not in obj:
            _fail(_at(path, key), "missing")
        _check_kind(obj[key], kind, _at(path, key))
    for key, kind in (optional or {}).items():
        if key in obj:
            _check_kind(obj[key], kind, _at(path, key))


def _check_kind(value, kind: str, path: str) -> None:
    nullable = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None and nullable:
        return
    types, name = KINDS[kind]
    # JSON true/false load as Python bools, which are ints; here they are never numbers
    if not isinstance(value, types) or (isinstance(value, bool) and kind != "bool"):
        _fail(path, f"expected {name}{' or null' if nullable else ''}, got {_show(value)}")


def _check_choice(obj: dict, key: str, allowed: tuple, path: str) -> None:
    if obj[key] not in allowed:
        _fail(_at(path, key), f"expected one of {', '.join(allowed)}, got {_show(obj[key])}")


def _check_non_negative(obj: dict, keys, path: str) -> None:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, (int, float)) and not value >= 0:  # also refuses NaN
            _fail(_at(path, key), f"expected a number >= 0, got {_show(value)}")


def _check_positive(obj: dict, key: str, path: str) -> None:
    if not obj[key] > 0:
        _fail(_at(path, key), f"expected a number > 0, got {_show(obj[key])}")


def _check_at_least(obj: dict, key: str, low: int, path: str) -> None:
    if obj[key] < low:
        _fail(_at(path, key), f"expected at least {low}, got {_show(obj[key])}")


def _check_int_list(values: list, length: int, low: int, path: str) -> None:
    if len(values) != length:
        _fail(path, f"expected {length} integers, got {len(values)} items")
    for i, value in enumerate(values):
        _check_kind(value, "int", f"{path}[{i}]")
        if value < low:
            _fail(f"{path}[{i}]", f"expected at least {low}, got {value}")


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _fail(path: str, message: str):
    raise ValueError(f"{path}: {message}")


# ---- markdown ----

def markdown(report: dict, plot_paths: list[Path] | tuple = ()) -> str:
    """The whole report as markdown. Plots are linked by file name: they are expected next to the markdown."""
    lines = [*_heading(report), "", *_rows_table(report)]
    roofline = _roofline_table(report)
    if roofline:
        lines += ["", *roofline]
    if report["link"] is not None:
        lines += ["", _link_line(report["link"])]
    if plot_paths:
        lines += ["", "## Plots", "", *[f"- ![{Path(p).stem}]({Path(p).name})" for p in plot_paths]]
    return "\n".join(lines) + "\n"


def _heading(report: dict) -> list[str]:
    lines = [f"# wanrt bench: {_device_name(report['machine'])}", "", _machine_line(report["machine"]), "",
             _config_line(report["config"]), "", f"Command: `{report['command']}`, started {report['started']}."]
    if report["interrupted"]:
        lines += ["", "**Interrupted** (Ctrl-C): only the rows finished before it are here."]
    return lines


def _device_name(machine: dict) -> str:
    if machine["device"] == "cpu":
        return "CPU"
    return machine["gpu"] or "CUDA device"


def _machine_line(machine: dict) -> str:
    versions = [f"torch {machine['torch']}"]
    versions += [f"triton {machine['triton']}"] if machine["triton"] else ["no triton"]
    versions += [f"driver {machine['driver']}"] if machine["driver"] else []
    versions += [f"Python {machine['python']}"]
    device = []
    if machine["memory_gib"] is not None:
        device.append(f"{machine['memory_gib']:g} GiB")
    if machine["capability"] is not None:
        device.append("compute capability {}.{}".format(*machine["capability"]))
    return "; ".join([", ".join(versions), *([", ".join(device)] if device else []), f"host CPU: {machine['cpu']}"])


def _config_line(config: dict) -> str:
    latents = "×".join(str(n) for n in config["latents"])
    line = (f"{config['variant']}, {config['size']}, {config['frame_num']} frames (latents {latents}); median of "
            f"{config['runs']} runs after {config['warmup']} warm-up; whole generation with {config['steps_whole']} "
            "steps")
    if config["link_gbps"] is not None:
        line += f"; host link emulated at {config['link_gbps']:g} GB/s"
    return line + f". Prompt: \"{_short(config['prompt'], 80)}\"."


def _rows_table(report: dict) -> list[str]:
    lines = ["| engine | setting | text (ms) | denoise step (ms) | decode (ms) | generate (s) | peak reserved (GiB) | "
             "device peak (GiB) | host peak (GiB) | vs wanrt | note |", "|---|---|" + "---:|" * 7 + "---|---|"]
    distinguishing = _distinguishing_fields(report["rows"])
    for row in report["rows"]:
        cells = [row["engine"], _setting(row, distinguishing), _ms(_median(row, "text")),
                 _ms(_median(row, "denoise_step")), _ms(_median(row, "decode")),
                 _seconds(_median(row, "generate")), _gib(_peak(row, "max_reserved_gib")),
                 _gib(_peak(row, "device_peak_gib")), _gib(_peak(row, "host_peak_gib")), _vs_wanrt(row), _note(row)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _roofline_table(report: dict) -> list[str]:
    """Measured time against the compute and link bounds the bench recorded, per wanrt row and phase."""
    rows = [(row, name, phase) for row in report["rows"] if row["engine"] == "wanrt"
            for name, phase in _phases_in_order(row) if "roofline" in phase]
    if not rows:
        return []
    lines = ["## Roofline (wanrt)", "",
             "Compute-bound: the phase's FLOPs at the peak matmul rate; link-bound: its streamed bytes at the host "
             "link rate; ratio: measured / the larger bound (1.0 would be the bound itself)."]
    if report["peaks"] is not None:
        p = report["peaks"]
        lines.append(f"Peaks measured on this machine: matmul {p['matmul_tflops']:g} TFLOP/s, HBM {p['hbm_gbps']:g} "
                     f"GB/s, host to device {p['h2d_gbps']:g} GB/s.")
    lines += ["", "| setting | phase | measured (ms) | compute-bound (ms) | link-bound (ms) | streamed (GiB) | "
                  "measured / bound |", "|---|---|---:|---:|---:|---:|---:|"]
    distinguishing = _distinguishing_fields(report["rows"])
    for row, name, phase in rows:
        bounds = phase["roofline"]
        bound = max(bounds["compute_ms"], bounds["link_ms"])
        ratio = f"{phase['median_ms'] / bound:.2f}" if bound > 0 else MISSING
        cells = [_setting(row, distinguishing), PHASE_NAMES[name], _ms(phase["median_ms"]),
                 _ms(bounds["compute_ms"]), _ms(bounds["link_ms"]), _gib(bounds["streamed_bytes"] / 2**30), ratio]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _link_line(link: dict) -> str:
    return (f"Link emulation: at {link['gbps']:g} GB/s a block of {link['block_bytes'] / MiB:.1f} MiB took "
            f"{link['measured_ms']:.2f} ms vs {link['expected_ms']:.2f} ms expected (ratio {link['ratio']:.2f}), "
            f"over {link['blocks_measured']} blocks.")


def _distinguishing_fields(rows: list[dict]) -> list[str]:
    """Which of scheme / attention / backend vary between rows: only those are worth a word in the setting."""
    return [key for key in ("scheme", "attention", "backend") if len({row[key] for row in rows}) > 1]


def _setting(row: dict, distinguishing: list[str]) -> str:
    if not distinguishing:
        return row["setting"]
    return f"{row['setting']} ({', '.join(row[key] for key in distinguishing)})"


def _vs_wanrt(row: dict) -> str:
    """Each phase's error against wanrt, e.g. "step 2.1e-03; decode 41.3 dB"."""
    parts = []
    for name, phase in _phases_in_order(row):
        measures = []
        if "rel_err_vs_wanrt" in phase:
            measures.append(f"{phase['rel_err_vs_wanrt']:.1e}")
        if "psnr_vs_wanrt_db" in phase:
            measures.append(_db(phase["psnr_vs_wanrt_db"]))
        if measures:
            parts.append(f"{SHORT_PHASE_NAMES[name]} {' / '.join(measures)}")
    return "; ".join(parts)


def _note(row: dict) -> str:
    if row["error"]:
        return "error: " + _short(row["error"], 70)
    return _short(row["phases"].get("decode", {}).get("plan", ""), 50)


def _phases_in_order(row: dict) -> list[tuple[str, dict]]:
    return [(name, row["phases"][name]) for name in PHASES if name in row["phases"]]


def _median(row: dict, phase: str) -> float | None:
    return row["phases"].get(phase, {}).get("median_ms")


def _peak(row: dict, key: str) -> float | None:
    values = [phase[key] for phase in row["phases"].values() if phase.get(key) is not None]
    return max(values) if values else None


def _ms(value: float | None) -> str:
    if value is None:
        return MISSING
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _seconds(ms: float | None) -> str:
    if ms is None:
        return MISSING
    return f"{ms / 1e3:.1f}" if ms >= 1e4 else f"{ms / 1e3:.2f}"


def _gib(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def _db(value: float) -> str:
    return "identical" if value == float("inf") else f"{value:.1f} dB"


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe in an error message would split the table row


# ---- plots ----

def plots(report: dict, prefix: Path) -> list[Path]:
    """Write {prefix}_latency.png and {prefix}_memory.png; return their paths ([] without matplotlib)."""
    try:
        import matplotlib  # noqa: F401  (optional: only the plots need it)
    except ImportError:
        print("plots need matplotlib: pip install matplotlib")
        return []
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("latency", _latency_figure), ("memory", _memory_figure)):
        figure = draw(report)
        FigureCanvasAgg(figure)  # Agg, without pyplot: no display needed and no global figure state
        path = prefix.with_name(f"{prefix.name}_{name}.png")
        figure.savefig(path, dpi=120, bbox_inches="tight")  # "tight" keeps the legends below the axes
        written.append(path)
    return written


def _latency_figure(report: dict):
    """Median latency against the VRAM budget for wanrt, peers as dashed horizontal lines."""
    from matplotlib.figure import Figure

    rows = [row for row in report["rows"] if row["phases"]]
    ours = [row for row in rows if row["engine"] == "wanrt"]
    peers = [row for row in rows if row["engine"] != "wanrt"]
    with_generate = any("generate" in row["phases"] for row in rows)
    figure = Figure(figsize=(13 if with_generate else 8, 5.5))
    axes = figure.subplots(1, 2 if with_generate else 1, squeeze=False)[0]
    phase_axes = {name: axes[-1] if name == "generate" else axes[0] for name in PHASES}
    resident_x = _resident_x(ours)
    _draw_wanrt_lines(ours, phase_axes, resident_x)
    _draw_peer_lines(peers, phase_axes)
    axes[0].set_title("per phase (median, ms, log scale)", fontsize=10)
    axes[0].set_ylabel("ms")
    if with_generate:
        axes[-1].set_title("whole generation (median, s)", fontsize=10)
        axes[-1].set_ylabel("s")
    for ax in axes:
        _budget_axis(ax, ours, resident_x)
        if ax.has_data():
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    if axes[0].has_data():
        axes[0].set_yscale("log")  # text, a step and the decode differ by orders of magnitude
    figure.suptitle(_figure_title(report, "Latency vs VRAM budget"))
    return figure


def _draw_wanrt_lines(ours: list[dict], phase_axes: dict, resident_x: float) -> None:
    """One line per phase (and per scheme / attention / backend, where those vary), budget ascending."""
    distinguishing = _distinguishing_fields(ours)
    groups: dict[str, list[dict]] = {}
    for row in ours:
        groups.setdefault(", ".join(row[key] for key in distinguishing), []).append(row)
    for marker, (group, rows) in zip("osD^v<>p*h" * 10, groups.items()):
        for phase in PHASES:
            points = sorted((_budget_x(row, resident_x), _median(row, phase)) for row in rows
                            if phase in row["phases"])
            if not points:
                continue
            xs, ys = zip(*points)
            if phase == "generate":
                ys = [y / 1e3 for y in ys]
            label = f"wanrt {PHASE_NAMES[phase]}" + (f" ({group})" if group else "")
            phase_axes[phase].plot(xs, ys, marker=marker, color=PHASE_COLORS[phase], label=label)


def _draw_peer_lines(peers: list[dict], phase_axes: dict) -> None:
    dashes = ["--", (0, (6, 2, 1, 2)), (0, (2, 2)), (0, (10, 3))]  # one pattern per peer row
    for i, row in enumerate(peers):
        for phase, measured in _phases_in_order(row):
            value = measured["median_ms"] / (1e3 if phase == "generate" else 1)
            phase_axes[phase].axhline(value, color=PHASE_COLORS[phase], linestyle=dashes[i % len(dashes)],
                                      linewidth=1.3, label=f"{row['engine']}, {row['setting']}: {PHASE_NAMES[phase]}")


def _resident_x(ours: list[dict]) -> float:
    """Where the resident (uncapped) row sits on the budget axis: one doubling right of the largest budget."""
    budgets = [row["budget_gib"] for row in ours if row["budget_gib"] is not None]
    return 2 * max(budgets) if budgets else 1.0


def _budget_x(row: dict, resident_x: float) -> float:
    return resident_x if row["budget_gib"] is None else row["budget_gib"]


def _budget_axis(ax, ours: list[dict], resident_x: float) -> None:
    if not ours:
        ax.set_xticks([])
        return
    budgets = sorted({row["budget_gib"] for row in ours if row["budget_gib"] is not None})
    ticks, labels = budgets, [f"{b:g}" for b in budgets]
    if any(row["budget_gib"] is None for row in ours):
        ticks, labels = [*ticks, resident_x], [*labels, "resident"]
    ax.set_xscale("log", base=2)  # budgets usually double
    ax.set_xticks(ticks, labels)
    ax.minorticks_off()
    ax.set_xlabel("VRAM budget (GiB)")
    ax.grid(True, alpha=0.3)


def _memory_figure(report: dict):
    """Per row, a pair of bars per phase: allocator max reserved (solid) and sampled device peak (hatched)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = report["rows"]
    phases = [name for name in PHASES if any(name in row["phases"] for row in rows)]
    figure = Figure(figsize=(max(8.0, 1.4 * len(rows) + 2), 5.5))
    ax = figure.subplots()
    width = 0.8 / max(1, 2 * len(phases))
    for i, row in enumerate(rows):
        _draw_memory_bars(ax, i, row, phases, width)
    ax.set_xticks(range(len(rows)), [f"{row['engine']}\n{textwrap.fill(row['setting'], 16)}" for row in rows],
                  fontsize=8)
    ax.set_ylabel("peak memory (GiB)")
    ax.grid(True, axis="y", alpha=0.3)
    handles = [Patch(color=PHASE_COLORS[name], label=PHASE_NAMES[name]) for name in phases]
    handles += [Patch(facecolor="gray", edgecolor="gray", label="max reserved (allocator)"),
                Patch(facecolor="white", edgecolor="gray", hatch="//", label="device peak (sampled)"),
                Line2D([], [], color="black", linestyle=":", label="budget")]
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=4, frameon=False)
    figure.suptitle(_figure_title(report, "Peak memory per phase"))
    return figure


def _draw_memory_bars(ax, i: int, row: dict, phases: list[str], width: float) -> None:
    for j, name in enumerate(phases):
        measured = row["phases"].get(name)
        if measured is None:
            continue
        x = i - 0.4 + width * (2 * j + 0.5)
        if measured["max_reserved_gib"] is not None:
            ax.bar(x, measured["max_reserved_gib"], width, color=PHASE_COLORS[name])
        if measured["device_peak_gib"] is not None:
            ax.bar(x + width, measured["device_peak_gib"], width, color=PHASE_COLORS[name], alpha=0.45, hatch="//",
                   edgecolor=PHASE_COLORS[name])
    if row["budget_gib"] is not None:
        ax.hlines(row["budget_gib"], i - 0.45, i + 0.45, colors="black", linestyles=":", linewidth=1.3)
    if row["error"]:
        ax.text(i, 0.05, "error (see report)", rotation=90, ha="center", va="bottom", fontsize=8, color="tab:red")


def _figure_title(report: dict, what: str) -> str:
    config = report["config"]
    title = (f"{what}: {_device_name(report['machine'])}, {config['variant']} {config['size']} x "
             f"{config['frame_num']} frames")
    return title + (" (interrupted)" if report["interrupted"] else "")


# ---- README ----

def readme_table(report: dict) -> str:
    """A compact table for the README: the main times and the peak reserved memory of each row."""
    lines = ["| engine, setting | denoise step (ms) | decode (ms) | generate (s) | peak reserved (GiB) |",
             "|---|---:|---:|---:|---:|"]
    distinguishing = _distinguishing_fields(report["rows"])
    for row in report["rows"]:
        label = f"{row['engine']}, {_setting(row, distinguishing)}" + (" (error, see report)" if row["error"] else "")
        cells = [label, _ms(_median(row, "denoise_step")), _ms(_median(row, "decode")),
                 _seconds(_median(row, "generate")), _gib(_peak(row, "max_reserved_gib"))]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def update_readme(report: dict, readme: Path, source: str) -> None:
    """Replace what lies between the bench marker lines of `readme` with the table and a line naming `source`."""
    readme = Path(readme)
    lines = readme.read_text(encoding="utf-8").splitlines(keepends=True)
    start, end = _marker_lines(lines, readme)
    block = f"\n{readme_table(report)}\n{_source_line(report, source)}\n\n"
    _write_atomically(readme, "".join(lines[:start + 1]) + block + "".join(lines[end:]))


def _marker_lines(lines: list[str], readme: Path) -> tuple[int, int]:
    starts = [i for i, line in enumerate(lines) if line.strip() == README_START]
    ends = [i for i, line in enumerate(lines) if line.strip() == README_END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"{readme}: needs one line {README_START!r} and, after it, one line {README_END!r}")
    return starts[0], ends[0]


def _source_line(report: dict, source: str) -> str:
    config = report["config"]
    line = (f"From [`{source}`]({source}): {_device_name(report['machine'])}, {config['variant']} {config['size']} x "
            f"{config['frame_num']} frames, started {report['started']}")
    return line + (" (interrupted)." if report["interrupted"] else ".")


def _write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder: a crash leaves the old file or the new one, never half."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644  # mkstemp's file is 0600
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


# ---- command line ----

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path, help="a wanrt-bench/1 JSON report")
    p.add_argument("--plots", action="store_true", help="also write PNG plots next to it (needs matplotlib)")
    p.add_argument("--readme", type=Path, help="replace the table between the bench markers of this file")
    args = p.parse_args(argv)
    report = json.loads(args.report.read_text(encoding="utf-8"))
    try:
        validate(report)
    except ValueError as e:
        sys.exit(f"{args.report}: {e}")
    written = plots(report, args.report.with_suffix("")) if args.plots else []
    # plots the run itself wrote (their paths as recorded), when they are still there
    shown = written or [Path(p) for p in report.get("plots", ()) if Path(p).exists()]
    out = args.report.with_suffix(".md")
    _write_atomically(out, markdown(report, shown))
    for path in [out, *written]:
        print(f"wrote {path}")
    if args.readme:
        # the link in the README is relative to the README's folder
        update_readme(report, args.readme, Path(os.path.relpath(args.report, args.readme.parent)).as_posix())
        print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
