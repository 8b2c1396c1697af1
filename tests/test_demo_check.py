"""demo_check's forced plans (the check itself needs a GPU): each setting forces its streaming paths and only
those, on the plan of the embedded demo model."""
import wanrt
import pytest

from experiments.demo_check import LAT, SETTINGS, STEPS, forced_streaming, smallest_budget
from wanrt.runtime.plan import PlanError


def test_each_setting_forces_its_paths_only():
    plan = wanrt.load(device="cpu").plan(LAT, STEPS)
    base = {p.name: p for p in plan.phases}
    assert base["denoise"].blocks.resident > 0 and base["denoise"].chunk != 32 and base["text"].chunk != 1
    assert base["decode"].tile != (4, 4)  # so each forced path below is a change
    for setting, paths in SETTINGS.items():
        forced = {p.name: p for p in forced_streaming(plan, paths).phases}
        assert (forced["denoise"].blocks.resident == 0) == ("slots" in paths)
        assert (forced["denoise"].chunk == 32) == ("chunks" in paths)
        assert (forced["text"].chunk == 1) == ("text" in paths)
        assert (forced["decode"].tile == (4, 4)) == ("tiles" in paths)
        if not paths:
            assert forced == base


def test_smallest_budget_is_the_least_the_planner_accepts():
    """The "smallest" setting: the plan fits there and not 1 MiB below; for the tiny demo model it is the default
    plan (everything resident), which is why the forced paths are diagnostics, not budgets."""
    pipe = wanrt.load(device="cpu")
    budget = smallest_budget(pipe)
    with pytest.raises(PlanError):
        pipe.plan(LAT, STEPS, budget=budget - 2**20)
    assert [p.describe() for p in pipe.plan(LAT, STEPS, budget=budget).phases] == \
        [p.describe() for p in pipe.plan(LAT, STEPS).phases]
