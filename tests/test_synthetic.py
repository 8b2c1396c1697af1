"""The demo model's training videos and the semantic check its generations must pass: the check accepts every
procedural video for what its prompt says, and rejects the wrong colour or direction."""
import numpy as np
import pytest

from training.synthetic import MOTIONS, PALETTE, check, parse_prompt, random_scene, render

SEEDS = range(20)


def scene_and_video(seed):
    scene = random_scene(np.random.default_rng(seed))
    return scene, render(scene, seed=seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_training_video_passes_the_check_for_its_prompt(seed):
    scene, video = scene_and_video(seed)
    assert video.shape == (17, 64, 64, 3) and video.dtype == np.uint8
    assert parse_prompt(scene.prompt) == (scene.colour, scene.motion), scene.prompt
    ok, why = check(video, scene.colour, scene.motion)
    assert ok, f"{scene.prompt}: {why}"


@pytest.mark.parametrize("seed", SEEDS)
def test_the_check_rejects_the_wrong_colour_or_motion(seed):
    scene, video = scene_and_video(seed)
    wrong_colour = next(c for c in PALETTE if c != scene.colour)
    assert not check(video, wrong_colour, scene.motion)[0]
    opposite = {"moves left": "moves right", "moves right": "moves left", "moves up": "moves down",
                "moves down": "moves up", "grows": "shrinks", "shrinks": "grows"}[scene.motion]
    assert not check(video, scene.colour, opposite)[0]
    assert not check(video[::-1], scene.colour, scene.motion)[0]  # played backwards


def test_noise_and_still_videos_fail():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (17, 64, 64, 3), dtype=np.uint8)
    still = np.repeat(render(random_scene(rng), seed=1)[:1], 17, axis=0)
    for motion in MOTIONS:
        assert not check(noise, "red", motion)[0] and not check(still, "red", motion)[0]


def test_videos_are_reproducible_and_prompts_cover_the_grammar():
    a, b = scene_and_video(3)[1], scene_and_video(3)[1]
    assert np.array_equal(a, b)
    scenes = [random_scene(np.random.default_rng(s)) for s in range(300)]
    assert {s.motion for s in scenes} == set(MOTIONS) and {s.colour for s in scenes} == set(PALETTE)
    assert any("gradient" in s.prompt for s in scenes) and any("gradient" not in s.prompt for s in scenes)
