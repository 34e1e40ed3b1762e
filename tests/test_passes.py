"""The calibration pass planner (calibration/passes.py): pure, so checked on sizes alone."""

from __future__ import annotations

from qtool.calibration.passes import plan_passes


def test_tensors_that_fit_the_budget_take_one_pass_and_runs_of_as_many_samples_as_fit():
    plan = plan_passes(["a", "b"], {"a": 100.0, "b": 150.0}, 1000)
    assert plan.groups == [["a", "b"]]
    assert plan.per_run == 4  # 1000 // 250


def test_over_the_budget_consecutive_groups_each_a_pass_and_one_sample_a_run():
    sizes = {"a": 400.0, "b": 500.0, "c": 200.0, "d": 1500.0, "e": 10.0}
    plan = plan_passes(list(sizes), sizes, 1000)
    assert plan.groups == [["a", "b"], ["c"], ["d"], ["e"]]  # d, over the budget alone, has a pass of its own
    assert plan.per_run == 1


def test_tensors_reduced_in_the_graph_count_towards_the_samples_a_run_holds_not_the_passes():
    sizes = {"exposed": 100.0, "reduced": 400.0}  # "reduced": measured in the graph, never exposed
    plan = plan_passes(["exposed"], sizes, 1000)
    assert plan.groups == [["exposed"]]
    assert plan.per_run == 2  # 1000 // 500, not 1000 // 100


def test_nothing_exposed_is_one_empty_pass():
    plan = plan_passes([], {}, 1000)
    assert plan.groups == [[]]
    assert plan.per_run == 1000  # empty sizes count as one byte a sample
