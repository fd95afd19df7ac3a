"""benchmarks/plan_ab.py: auto under the committed PLAN against PLAN with one band's `last` moved, on the same
problems and noise. The benchmarks are a package run from the repository root."""
import pytest

from benchmarks import plan_ab
from benchmarks.quality_problems import Problem, mixture
from thermosample import auto


def _one(monkeypatch):
    tiny = Problem("tiny-mix-d4-k3/edm", lambda: mixture(4, 3, 0.05, 0.2, 11).denoiser("edm"), (4,), 64)
    monkeypatch.setattr(plan_ab, "problems", lambda name, seeds: ([tiny], (7,)))


def test_an_arm_whose_band_ends_where_it_does_gives_the_same_config(monkeypatch, capsys):
    _one(monkeypatch)
    assert plan_ab.main(["default", "10", "--last", f"1={auto.PLAN[1].last}"]) == 0
    out = capsys.readouterr().out
    assert "tiny-mix-d4-k3/edm" in out and "same config SamplerConfig(" in out


def test_moving_a_band_boundary_compares_both_configs_on_the_same_noise(monkeypatch, capsys):
    """At 8 steps, with the other arm's 1-8-step band ending at 7, the other arm runs the 9-11-step band's plan:
    a different config; both are scored against one reference, and the committed PLAN is restored."""
    _one(monkeypatch)
    before = auto.PLAN
    assert plan_ab.main(["default", "8", "--last", "0=7"]) == 0
    assert auto.PLAN is before
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("tiny-mix")][0]
    ratio = float(line.split()[1])
    assert ratio > 0 and "switched" in line and "->" in line


def test_the_sets_it_knows():
    probs, seeds = plan_ab.problems("default", None)
    assert len(probs) == 9 and seeds == (500, 501, 502, 503)
    assert plan_ab.problems("learned", "5,6")[1] == (5, 6)
    probs, seeds = plan_ab.problems("fresh24", None)
    assert len(probs) == 6 and seeds == (9950, 9951, 9952, 9953)
    with pytest.raises(KeyError):
        plan_ab.problems("fresh999", None)
