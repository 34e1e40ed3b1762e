"""What the terminal shows: gate values with their margin visible, progress in the stage's own unit."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from qtool.cli.terminal import StageProgress, gate_value_text


@pytest.mark.parametrize("value, threshold, shown", [
    (0.9899999, 0.99, "0.9899999"),    # was "0.99 FAIL" against 0.99
    (0.98996, 0.99, "0.98996"),
    (0.999975, 0.98, "0.99997"),       # was "1 pass"
    (42.95, 20.0, "42.950"),
    (0.99, 0.99, "0.99000"),
])
def test_gate_values_show_the_margin(value, threshold, shown):
    assert gate_value_text(value, threshold) == shown
    assert (float(shown) < threshold) == (value < threshold)


@pytest.mark.parametrize("stage, unit", [("calibrate", "samples"), ("tune", "trials"), ("sensitivity", "nodes")])
def test_progress_lines_count_in_the_stage_unit(stage, unit):
    out = io.StringIO()
    with StageProgress(Console(file=out, force_terminal=False, width=120), quiet=False) as progress:
        progress(stage, 4, 4)
    assert out.getvalue().startswith(f"{stage}: 4/4 {unit}")


@pytest.mark.parametrize("ci, bar", [("true", False), ("1", False), ("false", True), ("", True), (None, True)])
def test_a_ci_run_on_a_terminal_gets_plain_lines_not_a_bar(monkeypatch, ci, bar):
    """A CI runner that gives the job a pseudo-terminal (GitLab with a tty, Jenkins, `script`) showed
    rich's redrawn bars, hundreds of escape-coded lines in the log; CI (set by every major CI service)
    now means plain lines there too."""
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    out = io.StringIO()
    with StageProgress(Console(file=out, force_terminal=True, width=120), quiet=False) as progress:
        progress("calibrate", 4, 4)
        assert (progress.bar is not None) == bar
    assert out.getvalue().startswith("calibrate: 4/4 samples") != bar


def test_a_gate_tune_missed_is_shown_as_the_summary_shows_it():
    """tune printed 'gate min_sqnr_db: not met by the best trial (value 27.43675942149157, threshold 30)'."""
    from qtool.cli.terminal import missed_gate_line

    gate = {"name": "min_sqnr_db", "threshold": 30.0, "value": 27.43675942149157, "passed": False}
    assert missed_gate_line(gate, "the best trial") == ("gate min_sqnr_db: not met by the best trial "
                                                        "(value 27.437, threshold 30)")
    assert "value n/a" in missed_gate_line({**gate, "value": None}, "the best trial")


def test_latency_row_gives_both_medians_to_the_same_precision_and_never_in_exponent_form():
    """speech_embedding's row read `2.13 → 1.8 ms` (`:.3g` drops the trailing zero) and a model over a
    second would read `1.23e+03 ms`."""
    from qtool.cli.terminal import latency_text

    def timing(reference_ms, candidate_ms):
        return {"reference": {"median_ms": reference_ms}, "candidate": {"median_ms": candidate_ms},
                "ratio": 0.85, "ratio_interval": [0.83, 0.87], "tight": True}

    assert latency_text(timing(2.1312, 1.8004)).startswith("2.13 → 1.80 ms (0.85× float, 95 % interval 0.83–0.87)")
    assert latency_text(timing(26.349, 22.217)).startswith("26.3 → 22.2 ms")
    assert latency_text(timing(1234.4, 998.7)).startswith("1234 → 999 ms")
    assert latency_text(timing(0.04567, 0.0391)).startswith("0.0457 → 0.0391 ms")


def test_progress_rate_counts_only_the_work_done_after_the_first_report(monkeypatch):
    """tune's latency stage reported its 17 trials at once and read '17/17 trials, 486478.8 trials/s':
    the rate divided everything done by the microseconds since that same first report."""
    clock = iter([100.0, 100.00003, 200.0, 205.0, 210.0])
    monkeypatch.setattr("qtool.cli.terminal.time.monotonic", lambda: next(clock))
    out = io.StringIO()
    with StageProgress(Console(file=out, force_terminal=False, width=120), quiet=False) as progress:
        progress("latency", 17, 17)
        progress("latency", 17, 17)
        progress("tune", 5, 20)   # five trials done before the clock starts
        progress("tune", 10, 20)
        progress("tune", 20, 20)
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["latency: 17/17 trials", "latency: 17/17 trials"]
    assert lines[-2:] == ["tune: 10/20 trials, 1.0 trials/s", "tune: 20/20 trials, 1.5 trials/s"]
