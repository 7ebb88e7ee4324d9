"""experiments/mutation_sample.py: the seeded sample and the score it reports (docs/MUTATION.md)."""

from __future__ import annotations

import pytest

from experiments import mutation_sample


def test_wilson_interval_matches_the_closed_form_values():
    # 9 of 10 and 0 of 20: the textbook 95 % Wilson intervals.
    low, high = mutation_sample.wilson(9, 10)
    assert low == pytest.approx(0.5958, abs=1e-4) and high == pytest.approx(0.9821, abs=1e-4)
    low, high = mutation_sample.wilson(0, 20)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.1611, abs=1e-4)


def test_sample_is_seeded_distinct_and_drawn_from_the_list(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = [f"pkg.mod.x_f__mutmut_{i}" for i in range(50)]
    (tmp_path / "mutant_names.txt").write_text("\n".join(reversed(names)) + "\n")
    mutation_sample.sample(20, seed=3)
    first = (tmp_path / "sample.txt").read_text().split()
    mutation_sample.sample(20, seed=3)
    assert (tmp_path / "sample.txt").read_text().split() == first
    assert len(set(first)) == 20 and set(first) <= set(names)
    mutation_sample.sample(20, seed=4)
    assert (tmp_path / "sample.txt").read_text().split() != first


def test_score_counts_verdicts(tmp_path, capsys):
    out = tmp_path / "results.txt"
    verdicts = ["a killed", "b survived", "c killed", "d no-tests"]
    lines = [f"{v} 1 wall 1 cpu 1" for v in verdicts]
    out.write_text("\n".join(lines) + "\n")
    mutation_sample.score(str(out))
    text = capsys.readouterr().out
    assert "{'killed': 2, 'no-tests': 1, 'survived': 1}" in text and "score 2/4 = 50.0%" in text
