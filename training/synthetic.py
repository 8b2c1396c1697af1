"""Procedural training videos for the embedded demo model, and the semantic check its generations must pass.

A video shows one coloured shape (circle, square, triangle) that moves left, right, up or down, or grows or shrinks,
over a plain or a vertical-gradient background, with the prompt that says so:
"a red circle moves right on a blue background". Everything is drawn with numpy from a seed, so any video can be
re-made exactly. `check` reads a generated video back: the shape is whatever differs from the background (per row, the median over
the clip), its colour must be the prompt's and its centroid (or area) must move as the prompt says.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

PALETTE = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 50),
           "purple": (150, 60, 190), "orange": (245, 140, 30), "white": (240, 240, 240), "cyan": (50, 200, 210)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1), "moves down": (0, 1),
           "grows": None, "shrinks": None}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    motion: str
    background: str  # a palette colour, or "a gradient from X to Y"
    background_rgb: tuple[tuple[int, int, int], tuple[int, int, int]]  # top and bottom colours

    @property
    def prompt(self) -> str:
        where = f"on a {self.background} background" if " " not in self.background else f"on {self.background}"
        return f"a {self.colour} {self.shape} {self.motion} {where}"


def random_scene(rng: np.random.Generator) -> Scene:
    colour = str(rng.choice(list(PALETTE)))
    others = [c for c in PALETTE if c != colour]
    top = str(rng.choice(others))
    if rng.random() < 0.5:
        background, rgb = top, (PALETTE[top], PALETTE[top])
    else:
        bottom = str(rng.choice([c for c in others if c != top]))
        background, rgb = f"a gradient from {top} to {bottom}", (PALETTE[top], PALETTE[bottom])
    return Scene(colour, str(rng.choice(SHAPES)), str(rng.choice(list(MOTIONS))), background, rgb)


def _mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "square":
        return (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    # triangle pointing up: inside the three half-planes
    top, base = cy - r, cy + r * 0.8
    half = (yy - top) / (base - top) * r
    return (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= half)


def render(scene: Scene, frames: int = 17, size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 [frames, size, size, 3]: the scene drawn with a random start, speed and size (from `seed`)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    top, bottom = (np.array(c, np.float32) for c in scene.background_rgb)
    t = (yy / size)[..., None]
    background = top * (1 - t) + bottom * t
    r0 = size * rng.uniform(0.1, 0.16)
    travel = size * rng.uniform(0.35, 0.5)  # how far the centre moves over the clip
    step = MOTIONS[scene.motion]
    start = size / 2 - (np.array(step or (0, 0)) * travel / 2)  # centred path: it stays in frame
    start += rng.uniform(-0.08, 0.08, 2) * size * (np.array(step or (0, 0)) == 0)
    colour = np.array(PALETTE[scene.colour], np.float32)
    video = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        a = f / (frames - 1)
        cx, cy = start + (np.array(step) * travel * a if step else 0)
        r = r0 * (1 + 1.2 * a if scene.motion == "grows" else 2.2 - 1.2 * a if scene.motion == "shrinks" else 1)
        m = _mask(scene.shape, yy, xx, cy, cx, r)[..., None]
        video[f] = np.where(m, colour, background).round().astype(np.uint8)
    return video


def parse_prompt(prompt: str) -> tuple[str, str] | None:
    """(colour, motion) a prompt asks for, or None if it is not in the grammar."""
    m = re.match(rf"a ({'|'.join(PALETTE)}) ({'|'.join(SHAPES)}) ({'|'.join(MOTIONS)}) on ", prompt)
    return (m[1], m[3]) if m else None


def check(video: np.ndarray, colour: str, motion: str, min_travel: float = 0.1) -> tuple[bool, str]:
    """Does the video's moving blob have `colour` and move as `motion` says? (ok, why): the blob is the pixels far
    from their row's median colour over the clip; its colour must be nearest to the asked one in the palette; its centroid
    must move at least `min_travel` of the frame the right way (grows/shrinks: its area by 30% or more)."""
    v = video.astype(np.float32)
    # backgrounds are plain or vertical gradients, and over the clip a shape covers well under half of any row
    background = np.median(v.transpose(1, 0, 2, 3).reshape(v.shape[1], -1, 3), axis=1)[None, :, None]
    fg = np.linalg.norm(v - background, axis=-1) > 60
    counts = fg.reshape(len(v), -1).sum(1)
    if (counts > 0).mean() < 0.8:
        return False, f"no moving blob in {int((counts == 0).sum())} of {len(v)} frames"
    mean = np.median(v[fg], axis=0)
    names = list(PALETTE)
    nearest = names[int(np.argmin([np.linalg.norm(mean - np.array(PALETTE[c])) for c in names]))]
    if nearest != colour:
        return False, f"the blob is {nearest}, not {colour}"
    frames = np.flatnonzero(counts)
    if motion in ("grows", "shrinks"):
        first, last = counts[frames[: len(frames) // 3]].mean(), counts[frames[-(len(frames) // 3):]].mean()
        ok = last > 1.3 * first if motion == "grows" else first > 1.3 * last
        return ok, f"area {first:.0f} -> {last:.0f} px"
    yy, xx = np.mgrid[0:v.shape[1], 0:v.shape[2]]
    centroid = np.array([[xx[fg[f]].mean(), yy[fg[f]].mean()] for f in frames])
    slope = np.polyfit(frames, centroid, 1)[0] * (len(v) - 1) / v.shape[2]  # travel over the clip, in frame widths
    travel = float(np.dot(slope, MOTIONS[motion]))
    return travel >= min_travel, f"moved {travel:+.2f} of the frame {motion.split()[1]}"


def evaluate(pipe, seeds=range(20), steps: int | None = None, shift: float | None = None,
             guide: float | None = None, expect=None, frames: dict | None = None, **sampling) -> dict:
    """Generate one video per seed for the prompt of that seed's scene and check each: the pass rate and per-seed
    (prompt, ok, why). `pipe` is a WanPipeline of a model trained on these scenes; sampling settings left None are
    the model's own (its config.json's); `sampling` passes more of generate's (e.g. preset="distill4"). `expect`
    maps the prompt's scene to the one the video should show (default: itself); `frames`, if given, receives each
    seed's video."""
    results = []
    for seed in seeds:
        scene = random_scene(np.random.default_rng(10_000 + seed))  # prompts apart from the training stream's
        video = pipe.generate(scene.prompt, size="64*64", frame_num=17, sample_steps=steps, sample_shift=shift,
                              sample_guide_scale=guide, base_seed=seed, progress=False, **sampling).frames
        if frames is not None:
            frames[seed] = video
        shown = expect(scene) if expect else scene
        ok, why = check(video, shown.colour, shown.motion)
        results.append({"seed": seed, "prompt": scene.prompt, "ok": bool(ok), "why": why})
    return {"pass_rate": sum(r["ok"] for r in results) / len(results), "results": results}
