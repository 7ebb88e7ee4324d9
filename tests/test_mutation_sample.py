"""experiments/mutation_sample.py: the seeded sample and the score it reports (docs/MUTATION.md)."""

from __future__ import annotations

import json

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


_MUTATED_FILE = """\
def x_f__mutmut_orig(a, b=1):
    c = a + b
    if c > 2:
        return g(
            c,
            a,
        )
    return c


def x_f__mutmut_1(a, b=1):
    c = a - b
    if c > 2:
        return g(
            c,
            a,
        )
    return c


def x_f__mutmut_2(a, b=1):
    c = a + b
    if c > 2:
        return g(
            c,
            None,
        )
    return c


def x_f__mutmut_3(a, b=2):
    c = a + b
    if c > 2:
        return g(
            c,
            a,
        )
    return c
"""


def _line_map(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(_MUTATED_FILE)
    # Which tests ran which lines of the unmutated function (lines 1-8): t_small never takes the branch, t_big
    # does, and t_slow runs only the first statement; t_broken failed unmutated and is left out everywhere.
    tests = ["t_big", "t_broken", "t_slow", "t_small"]
    # Coverage records the multi-line return on its first line only.
    lines = {"2": [0, 1, 2, 3], "3": [0, 3], "4": [0], "8": [3]}
    record = {
        "tests": tests,
        "durations": {"t_big": 0.5, "t_broken": 0.1, "t_slow": 9.0, "t_small": 0.2},
        "unusable": ["t_broken"],
        "lines": {"pkg/mod.py": lines},
    }
    (tmp_path / "sweep-lines.json").write_text(json.dumps(record))
    return mutation_sample._LineMap(tmp_path)


def test_a_mutant_gets_the_tests_that_ran_its_statement_fastest_first(tmp_path, monkeypatch):
    line_map = _line_map(tmp_path)
    # A change on line 2 (run by every usable test), fastest first, the test that failed unmutated left out.
    assert line_map.tests_for("pkg.mod.x_f__mutmut_1") == (["t_small", "t_big", "t_slow"], "statement")
    # A change on the third line of a statement that spans lines 4-7: the tests that ran any of its lines.
    assert line_map.tests_for("pkg.mod.x_f__mutmut_2") == (["t_big"], "statement")
    # A changed default: every test that ran any line of the function.
    assert line_map.tests_for("pkg.mod.x_f__mutmut_3") == (["t_small", "t_big", "t_slow"], "function")
    monkeypatch.setenv("MUTATION_SWEEP_WHOLE_FUNCTION", "1")
    assert line_map.tests_for("pkg.mod.x_f__mutmut_2") == (["t_small", "t_big", "t_slow"], "function")


def test_show_diffs_a_mutant_against_its_original(tmp_path):
    diff = _line_map(tmp_path).diff("pkg.mod.x_f__mutmut_2")
    assert "-            a,\n+            None," in diff and "x_f__mutmut_2" in diff.splitlines()[1]


def test_lines_of_added_tests_merge_into_the_map_and_replace_a_rerun_test():
    old = {
        "tests": ["a", "b"],
        "durations": {"a": 1.0, "b": 2.0},
        "unusable": ["b"],
        "lines": {"m.py": {"1": [0, 1], "2": [1]}, "n.py": {"5": [1]}},
    }
    # "b" ran again (its file changed) and now reaches only line 3; "c" is new.
    new = {"tests": ["b", "c"], "durations": {"b": 0.5, "c": 3.0}, "unusable": [], "lines": {"m.py": {"3": [0, 1]}}}
    merged = mutation_sample.merge_records(old, new)
    assert merged["tests"] == ["a", "b", "c"]
    assert merged["durations"] == {"a": 1.0, "b": 0.5, "c": 3.0}
    assert merged["unusable"] == []
    assert merged["lines"] == {"m.py": {"1": [0], "3": [1, 2]}}


def test_lines_of_some_paths_keep_the_selection_options_and_drop_its_paths():
    args = ["tests/core/", "--deselect", "tests/a.py::t", "-m", "not slow", "-x", "tests/b.py", "-p", "no:cache"]
    kept = ["--deselect", "tests/a.py::t", "-m", "not slow", "-x", "-p", "no:cache"]
    assert mutation_sample._options_only(args) == kept


def test_cpu_seconds_grow_with_work_and_are_none_for_a_missing_process():
    import os
    import time

    before = mutation_sample._cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    after = mutation_sample._cpu_seconds(os.getpid())
    assert before is not None and after is not None
    assert 0.2 <= after - before <= 5.0
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    assert mutation_sample._cpu_seconds(child) is None
