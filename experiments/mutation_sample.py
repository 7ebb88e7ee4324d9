"""A uniform random sample of mutmut's mutants, run with mutmut's own test mapping (docs/MUTATION.md).

A full ``mutmut run`` of the library does not fit a shared 2-core machine: this draws a seeded sample of one
package's mutants and runs exactly those. Run every step from a *copy* of the repository whose ``pyproject.toml``
sets ``only_mutate`` to the package and ``pytest_add_cli_args_test_selection`` to its fast tests (the git tree stays
clean), under ``nice -n 19``::

    python experiments/mutation_sample.py generate            # mutmut's mutants -> mutant_names.txt
    python experiments/mutation_sample.py sample 300 --seed 21  # -> sample.txt (any prefix is a uniform sample)
    python -m mutmut run <one name>                           # mutmut's stats run: mutants/mutmut-stats.json
    python experiments/mutation_sample.py run sample.txt results.txt --jobs 2
    python experiments/mutation_sample.py score results.txt

``run`` gives each mutant the tests mutmut's stats run saw reach its function, fastest first, stopping at the first
failure, in a child forked from one process that imported torch, the library and the test modules once (mutmut's
``run`` repeats a clean run of every selected test first, which on a loaded machine costs as much as the sample).

A **whole package** fits too, with a finer test map (no mutmut stats run needed)::

    python experiments/mutation_sample.py generate
    python experiments/mutation_sample.py lines                # every selected test once, line coverage per test
    python experiments/mutation_sample.py sweep mutant_names.txt results.txt --jobs 1
    python experiments/mutation_sample.py show results.txt     # the survivors' diffs (or: show <mutant name>)
    python experiments/mutation_sample.py lines tests/x/test_new.py   # tests added since: merged into the map
    python experiments/mutation_sample.py check survivors.txt tests/x/test_new.py   # does a new test kill them?

``lines`` runs the selection once under coverage.py, one coverage context per test, and writes which tests execute
each line of the mutated copy (``mutants/sweep-lines.json``). ``sweep`` finds the line a mutant changes (its
function against mutmut's copy of the original), widens it to the whole statement around it, and gives the mutant
only the tests that executed that statement: a test that never runs the changed code cannot tell the mutant from
the original, so the verdicts are those of mutmut's function-wide map, while a survivor of a large function runs a
handful of tests instead of hundreds. A change to a signature or default falls back to every test that ran any
line of the function (``MUTATION_SWEEP_WHOLE_FUNCTION=1`` does so for every mutant, to check the statement map
against it; ``MUTATION_SWEEP_CONTROL=1`` runs each mutant's tests with no mutant switched on, where every verdict
must be ``survived``: a "killed" there is a test that fails in that order or in a forked child). The children run
the collected test items directly (no pytest start-up per mutant). A child past three times its CPU limit in wall
time, or with no CPU progress for ``MUTATION_SWEEP_STALL_S`` seconds (90), is ended and its tests run again in a
fresh Python process (``pytest -x`` on the same test ids, the mutant chosen by ``MUTANT_UNDER_TEST``); an end of
that one too reads ``stuck``. A fork blocks on a lock a thread pool of the parent held when it forked (a test that
asks torch for two threads; ``MUTATION_SWEEP_NO_WARMUP=1`` skips the warm-up), or the mutant waits forever.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path


def generate() -> None:
    """Write mutmut's mutants into ./mutants and their names, one a line, to mutant_names.txt."""
    import mutmut.__main__ as mm

    os.makedirs("mutants", exist_ok=True)
    mm.set_mutant_under_test("mutant_generation")
    mm.copy_src_dir()
    mm.copy_also_copy_files()
    mm.setup_source_paths()
    mm.store_lines_covered_by_tests()
    mm.create_mutants(1)
    names = []
    for path in mm.walk_mutatable_files():
        data = mm.SourceFileMutationData(path=path)
        data.load()
        names += list(data.exit_code_by_key)
    Path("mutant_names.txt").write_text("\n".join(names) + "\n")
    print(f"{len(names)} mutants")


def sample(k: int, seed: int) -> None:
    """``random.sample`` of the sorted names: selection order, so every prefix is itself a uniform sample."""
    names = sorted(n for n in Path("mutant_names.txt").read_text().split() if n)
    chosen = random.Random(seed).sample(names, min(k, len(names)))
    Path("sample.txt").write_text("\n".join(chosen) + "\n")
    print(f"{len(chosen)} of {len(names)}")


def run(names_file: str, out_file: str, jobs: int) -> None:
    """Run each mutant of ``names_file`` not yet in ``out_file``; append ``<name> <verdict> <tests> wall cpu``."""
    root = Path("mutants").resolve()
    os.chdir(root)
    sys.path.insert(0, str(root))
    os.environ["PY_IGNORE_IMPORTMISMATCH"] = "1"
    import pytest
    from mutmut.mutation.trampoline import set_mutant_under_test

    out_path = Path(out_file).resolve() if os.path.isabs(out_file) else (root.parent / out_file)
    done = {line.split()[0] for line in out_path.read_text().splitlines() if line} if out_path.exists() else set()
    stats = json.loads(Path("mutmut-stats.json").read_text())
    by_function, duration = stats["tests_by_mangled_function_name"], stats["duration_by_test"]
    plan = []
    for name in (root.parent / names_file).read_text().split():
        if name and name not in done:
            tests = by_function.get(name.partition("__mutmut_")[0], [])
            plan.append((name, sorted(tests, key=lambda t: (duration.get(t, 0.0), t))))
    files = sorted({t.split("::")[0] for _, tests in plan for t in tests})
    if files:  # import every test module here once; the children inherit them
        with open(os.devnull, "w") as devnull:
            stdout, stderr = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = devnull
            pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", "--rootdir=.", *files])
            sys.stdout, sys.stderr = stdout, stderr
    out = out_path.open("a")
    running: dict[int, tuple[str, int, float]] = {}

    def reap(block: bool) -> None:
        while running:
            pid, status, usage = os.wait4(-1, 0 if block else os.WNOHANG)
            if pid == 0:
                return
            name, n_tests, start = running.pop(pid)
            if os.WIFSIGNALED(status):
                verdict = "timeout"
            else:
                verdict = {0: "survived", 1: "killed"}.get(os.waitstatus_to_exitcode(status), "error")
            cpu = usage.ru_utime + usage.ru_stime
            out.write(f"{name} {verdict} {n_tests} wall {time.time() - start:.1f} cpu {cpu:.1f}\n")
            out.flush()
            block = False

    for name, tests in plan:
        if not tests:
            out.write(f"{name} no-tests 0 wall 0 cpu 0\n")
            out.flush()
            continue
        while len(running) >= jobs:
            reap(True)
        limit = int(60 + 10 * sum(duration.get(t, 0.0) for t in tests))  # CPU seconds
        start = time.time()
        pid = os.fork()
        if pid == 0:
            sys.stdout = sys.stderr = open(os.devnull, "w")
            resource.setrlimit(resource.RLIMIT_CPU, (limit, limit + 5))
            set_mutant_under_test(name)
            code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--rootdir=.", *tests])
            os._exit(int(code))
        running[pid] = (name, len(tests), start)
    while running:
        reap(True)


def _mutmut_config(root: Path) -> dict:
    import tomllib  # Python 3.11+, as mutmut 3 itself

    return tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["mutmut"]


def _selection_args(root: Path) -> list[str]:
    """The pytest arguments of ``[tool.mutmut]`` in the copy's ``pyproject.toml`` (selection first)."""
    config = _mutmut_config(root)
    return [*config.get("pytest_add_cli_args_test_selection", []), *config.get("pytest_add_cli_args", [])]


def _enter_mutants() -> Path:
    root = Path("mutants").resolve()
    os.chdir(root)
    sys.path.insert(0, str(root))
    os.environ["PY_IGNORE_IMPORTMISMATCH"] = "1"
    return root


# Options of the selection that take a value: kept, with it, when ``lines`` runs only some test paths.
_VALUED_OPTIONS = {"--deselect", "-m", "-k", "-p", "--ignore"}


def _options_only(args: list[str]) -> list[str]:
    """The selection's options without its test paths (``-m "not slow"``, ``--deselect <id>``, ...)."""
    kept, i = [], 0
    while i < len(args):
        if args[i].startswith("-"):
            takes_value = args[i] in _VALUED_OPTIONS
            kept += args[i : i + 1 + takes_value]
            i += 1 + takes_value
        else:
            i += 1
    return kept


def merge_records(old: dict, new: dict) -> dict:
    """``old``'s line map with ``new``'s tests added; a test in both keeps only what ``new`` recorded of it."""
    tests = sorted(set(old["tests"]) | set(new["tests"]))
    index = {t: k for k, t in enumerate(tests)}
    replaced = set(new["tests"])
    rows: dict[str, dict[str, set[int]]] = {}
    for record, keep in ((old, lambda t: t not in replaced), (new, lambda t: True)):
        for path, lines_ in record["lines"].items():
            for line, ids in lines_.items():
                chosen = {index[record["tests"][k]] for k in ids if keep(record["tests"][k])}
                if chosen:
                    rows.setdefault(path, {}).setdefault(line, set()).update(chosen)
    unusable = {t for t in old["unusable"] if t not in replaced} | set(new["unusable"])
    return {
        "tests": tests,
        "durations": {**old["durations"], **new["durations"]},
        "unusable": sorted(unusable),
        "lines": {f: {line: sorted(ids) for line, ids in r.items()} for f, r in rows.items()},
    }


def lines(paths: list[str] | None = None) -> None:
    """Run every selected test once under coverage.py; write the tests that execute each line of the copy.

    With ``paths`` (test files or folders added since the last ``lines`` of an unchanged library), only those run,
    with the selection's options, and their lines are merged into the existing ``sweep-lines.json``.
    """
    root = _enter_mutants()
    import coverage
    import pytest
    from _pytest.runner import runtestprotocol

    config = _mutmut_config(root)
    include = [str(root / glob) for glob in config.get("only_mutate", ["lightning_adapters/*"])]

    class Record:
        def pytest_runtestloop(self, session: pytest.Session) -> bool:
            items = session.items
            durations, failed = {}, []
            cov = coverage.Coverage(data_file=None, include=include, config_file=False)
            cov.start()
            for i, item in enumerate(items):
                cov.switch_context(item.nodeid)
                start = time.perf_counter()
                reports = runtestprotocol(item, nextitem=items[i + 1] if i + 1 < len(items) else None, log=False)
                durations[item.nodeid] = time.perf_counter() - start
                if any(r.failed or r.skipped for r in reports):
                    failed.append(item.nodeid)
            cov.stop()
            data = cov.get_data()
            ids = sorted(durations)
            index = {t: k for k, t in enumerate(ids)}
            by_file = {}
            for path in data.measured_files():
                rows = {
                    line: sorted(index[c] for c in contexts if c in index)
                    for line, contexts in data.contexts_by_lineno(path).items()
                }
                by_file[os.path.relpath(path, root)] = {str(k): v for k, v in rows.items() if v}
            record = {"tests": ids, "durations": durations, "unusable": failed, "lines": by_file}
            if paths:
                record = merge_records(json.loads(Path("sweep-lines.json").read_text()), record)
            Path("sweep-lines.json").write_text(json.dumps(record))
            print(f"{len(ids)} tests, {len(failed)} failed or skipped (left out)", file=sys.__stdout__)
            return True

    selection = [*paths, *_options_only(_selection_args(root))] if paths else _selection_args(root)
    pytest.main(["-q", "-p", "no:randomly", "--rootdir=.", *selection], plugins=[Record()])


class _LineMap:
    """The tests that execute the code one mutant changes, from ``sweep-lines.json``."""

    def __init__(self, root: Path) -> None:
        record = json.loads((root / "sweep-lines.json").read_text())
        self.tests, self.durations = record["tests"], record["durations"]
        unusable = set(record["unusable"])
        self.lines = {
            f: {int(k): [self.tests[i] for i in v if self.tests[i] not in unusable] for k, v in rows.items()}
            for f, rows in record["lines"].items()
        }
        self.root = root
        self.parsed: dict[str, tuple[list[str], dict[str, ast.AST]]] = {}

    def _file(self, rel: str) -> tuple[list[str], dict[str, ast.AST]]:
        if rel not in self.parsed:
            text = (self.root / rel).read_text()
            functions = {
                n.name: n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            }
            self.parsed[rel] = (text.splitlines(), functions)
        return self.parsed[rel]

    def diff(self, name: str) -> str:
        """The mutant's change as a unified diff of its function against the original, with the file's line numbers."""
        module, _, function = name.rpartition(".")
        rel = module.replace(".", "/") + ".py"
        source, functions = self._file(rel)
        orig, mutant = functions[function.partition("__mutmut_")[0] + "__mutmut_orig"], functions[function]
        a = source[orig.lineno - 1 : orig.end_lineno]
        b = [line.replace(function, orig.name) for line in source[mutant.lineno - 1 : mutant.end_lineno]]
        return "\n".join(difflib.unified_diff(a, b, rel, f"{rel} ({function})", n=1, lineterm=""))

    def _executed(self, rel: str, first: int, last: int) -> set[str]:
        rows = self.lines.get(rel, {})
        return {t for line in range(first, last + 1) for t in rows.get(line, ())}

    def tests_for(self, name: str) -> tuple[list[str], str]:
        """The tests to run, fastest first, and how they were found (``statement`` or ``function``)."""
        module, _, function = name.rpartition(".")
        rel = module.replace(".", "/") + ".py"
        source, functions = self._file(rel)
        orig = functions[function.partition("__mutmut_")[0] + "__mutmut_orig"]
        mutant = functions[function]
        a = source[orig.lineno - 1 : orig.end_lineno]
        b = [line.replace(function, orig.name) for line in source[mutant.lineno - 1 : mutant.end_lineno]]
        changed = set()
        for tag, i1, i2, _, _ in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
            if tag != "equal":
                changed.update(range(i1, i2) if i2 > i1 else (max(i1 - 1, 0), i1))
        statements = [n for n in ast.walk(orig) if isinstance(n, ast.stmt) and n is not orig]
        found, how = set(), "statement"
        if os.environ.get("MUTATION_SWEEP_WHOLE_FUNCTION"):  # to check the statement map against the wide one
            changed = {0}
        for index in sorted(changed):
            line = orig.lineno + index
            around = [s for s in statements if s.lineno <= line <= s.end_lineno]
            if not around:  # the signature, a default or a decorator: any call may see it
                found, how = self._executed(rel, orig.lineno, orig.end_lineno), "function"
                break
            inner = min(around, key=lambda s: s.end_lineno - s.lineno)
            found |= self._executed(rel, inner.lineno, inner.end_lineno)
        return sorted(found, key=lambda t: (self.durations.get(t, 0.0), t)), how


def show(names: list[str]) -> None:
    """Print each mutant's diff (a name, or a results file whose survivors to show)."""
    root = _enter_mutants()
    line_map = _LineMap(root)
    for arg in names:
        path = root.parent / arg
        if path.exists():
            rows = [line.split() for line in path.read_text().splitlines() if line]
            chosen = [r[0] for r in rows if r[1] in ("survived", "no-tests")]
        else:
            chosen = [arg]
        for name in chosen:
            print(f"# {name}\n{line_map.diff(name)}\n")


def _first_failure(items: list) -> str | None:
    """Run the collected pytest ``items`` in order; the node id of the first that fails, or ``None``."""
    from _pytest.runner import runtestprotocol

    for i, item in enumerate(items):
        following = items[i + 1] if i + 1 < len(items) else None
        if any(r.failed for r in runtestprotocol(item, nextitem=following, log=False)):
            return item.nodeid
    return None


def _cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds process ``pid`` has used so far (Linux ``/proc``), ``None`` if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sweep(names_file: str, out_file: str, jobs: int) -> None:
    """Like ``run``, with the statement-level test map of ``lines``; appends ``<name> <verdict> <tests> wall cpu``."""
    # The parent runs one test of each file before it forks (the children then start with torch's, transformers' and
    # the fixtures' lazy imports done): one OpenMP thread keeps a process that ran torch safe to fork.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    root = _enter_mutants()
    import pytest
    from _pytest.runner import runtestprotocol
    from mutmut.mutation.trampoline import set_mutant_under_test

    out_path = Path(out_file) if os.path.isabs(out_file) else (root.parent / out_file)
    done = {line.split()[0] for line in out_path.read_text().splitlines() if line} if out_path.exists() else set()
    line_map = _LineMap(root)
    names = [n for n in (root.parent / names_file).read_text().split() if n and n not in done]

    class Sweep:
        def pytest_runtestloop(self, session: pytest.Session) -> bool:
            import torch
            from _pytest.python import Function

            torch.set_num_threads(1)
            # A failure's report would parse the whole mutated file (thousands of mutants) for its traceback: the
            # verdict needs only the outcome.
            Function.repr_failure = lambda self, excinfo: "failed"
            items = session.items
            # Warm up, unmutated: the fastest test of each test file (the lazy imports its file needs).
            fastest: dict[str, pytest.Item] = {}
            for item in items:
                path, seconds = item.nodeid.split("::")[0], line_map.durations.get(item.nodeid, 0.0)
                if path not in fastest or seconds < line_map.durations.get(fastest[path].nodeid, 0.0):
                    fastest[path] = item
            warm = [] if os.environ.get("MUTATION_SWEEP_NO_WARMUP") else list(fastest.values())
            for i, item in enumerate(warm):
                runtestprotocol(item, nextitem=warm[i + 1] if i + 1 < len(warm) else None, log=False)
            by_id = {item.nodeid: item for item in items}
            out = out_path.open("a")
            running: dict[int, tuple[str, int, str, float, float]] = {}

            stall_s = float(os.environ.get("MUTATION_SWEEP_STALL_S", "90"))
            progress: dict[int, tuple[float, float]] = {}  # pid -> (CPU seconds seen, when they last grew)
            retried: set[str] = set()

            def stalled(child: int) -> bool:
                """True once ``child`` has used no CPU time for ``stall_s`` seconds (blocked on a lock)."""
                cpu = _cpu_seconds(child)
                if cpu is None:
                    return False
                seen, since = progress.get(child, (-1.0, time.time()))
                if cpu != seen:
                    progress[child] = (cpu, time.time())
                    return False
                return time.time() - since > stall_s

            def reap(block: bool) -> None:
                while running:
                    pid, status, usage = os.wait4(-1, os.WNOHANG)
                    if pid == 0:
                        # A child past its wall limit, or with no CPU progress for stall_s, is stuck: end it.
                        for child, (_, _, _, start, wall) in running.items():
                            if time.time() - start > wall or stalled(child):
                                os.kill(child, signal.SIGKILL)
                        if not block:
                            return
                        time.sleep(0.02)
                        continue
                    name, n_tests, how, start, wall = running.pop(pid)
                    progress.pop(pid, None)
                    if os.WIFSIGNALED(status):
                        verdict = "stuck" if os.WTERMSIG(status) == signal.SIGKILL else "timeout"
                    else:
                        verdict = {0: "survived", 1: "killed"}.get(os.waitstatus_to_exitcode(status), "error")
                    if verdict == "stuck" and name not in retried:
                        # A deadlock inherited across fork (torch's or OpenMP's thread pool, e.g. a test that asks
                        # for two threads): the mutant's tests run again in a fresh Python process instead.
                        retried.add(name)
                        start_fresh(name, how)
                        continue
                    if pid in fresh:
                        fresh.discard(pid)
                        how += "+fresh-process"
                    cpu = usage.ru_utime + usage.ru_stime
                    out.write(f"{name} {verdict} {n_tests} wall {time.time() - start:.1f} cpu {cpu:.1f} {how}\n")
                    out.flush()
                    block = False

            fresh: set[int] = set()  # pids of fresh processes (not forks)
            options = _options_only(_selection_args(root))

            def start_fresh(name: str, how: str) -> None:
                tests = line_map.tests_for(name)[0]
                items = [by_id[t] for t in tests if t in by_id]
                limit = int(60 + 10 * sum(line_map.durations.get(t, 0.0) for t in tests))
                env = dict(os.environ)
                if not os.environ.get("MUTATION_SWEEP_CONTROL"):
                    env["MUTANT_UNDER_TEST"] = name
                cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
                cmd += ["--rootdir=.", *options, *[item.nodeid for item in items]]
                proc = subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CPU, (limit + 30, limit + 35)),
                )
                fresh.add(proc.pid)
                running[proc.pid] = (name, len(items), how, time.time(), 3 * limit + 120)

            def start_child(name: str, how: str) -> None:
                tests = line_map.tests_for(name)[0]
                items = [by_id[t] for t in tests if t in by_id]
                limit = int(60 + 10 * sum(line_map.durations.get(t, 0.0) for t in tests))  # CPU seconds
                start = time.time()
                pid = os.fork()
                if pid == 0:
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 1)
                    os.dup2(devnull, 2)
                    resource.setrlimit(resource.RLIMIT_CPU, (limit, limit + 5))
                    if not os.environ.get("MUTATION_SWEEP_CONTROL"):  # control: the same tests, unmutated
                        set_mutant_under_test(name)
                    os._exit(0 if _first_failure(items) is None else 1)
                running[pid] = (name, len(items), how, start, 3 * limit + 60)

            for name in names:
                tests, how = line_map.tests_for(name)
                items = [by_id[t] for t in tests if t in by_id]
                if not items:
                    out.write(f"{name} no-tests 0 wall 0 cpu 0 {how}\n")
                    out.flush()
                    continue
                while len(running) >= jobs:
                    reap(True)
                start_child(name, how)
            while running:
                reap(True)
            return True

    pytest.main(["-q", "-p", "no:randomly", "--rootdir=.", *_selection_args(root)], plugins=[Sweep()])


def check(paths: list[str], names: list[str]) -> None:
    """Run the tests under ``paths`` against each named mutant: ``<name> killed <first failing test>`` or ``survived``.

    For a test being written against survivors: the files are collected once, each mutant runs in a forked child,
    and a first child with no mutant checks that the tests pass unmutated (a mutant only counts as killed then).
    """
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    root = _enter_mutants()
    import pytest
    from mutmut.mutation.trampoline import set_mutant_under_test

    class Check:
        def pytest_runtestloop(self, session: pytest.Session) -> bool:
            import torch

            torch.set_num_threads(1)
            items = session.items
            print(f"{len(items)} tests, {len(names)} mutants", file=sys.__stdout__, flush=True)
            for name in ["", *names]:
                read, write = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(read)
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 1)
                    os.dup2(devnull, 2)
                    if name:
                        set_mutant_under_test(name)
                    failing = _first_failure(items)
                    if failing is not None:
                        os.write(write, failing.encode())
                    os._exit(0 if failing is None else 1)
                os.close(write)
                with os.fdopen(read) as pipe:
                    failing = pipe.read()
                os.waitpid(pid, 0)
                if not name:
                    if failing:
                        print(f"unmutated: {failing} fails: no verdicts", file=sys.__stdout__)
                        return True
                    continue
                verdict = f"killed {failing}" if failing else "survived"
                print(f"{name} {verdict}", file=sys.__stdout__, flush=True)
            return True

    options = _options_only(_selection_args(root))
    pytest.main(["-q", "-p", "no:randomly", "--rootdir=.", *paths, *options], plugins=[Check()])


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` (95 % for ``z = 1.96``)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def score(out_file: str) -> None:
    """Counts per verdict and the score (killed / run) with its 95 % Wilson interval."""
    verdicts = [line.split()[1] for line in Path(out_file).read_text().splitlines() if line]
    counts = {v: verdicts.count(v) for v in sorted(set(verdicts))}
    killed, n = counts.get("killed", 0), len(verdicts)
    low, high = wilson(killed, n)
    share = 100 * killed / max(n, 1)
    print(counts, f"score {killed}/{n} = {share:.1f}% (95% Wilson {100 * low:.1f}-{100 * high:.1f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("generate")
    p = sub.add_parser("sample")
    p.add_argument("k", type=int)
    p.add_argument("--seed", type=int, default=21)
    p = sub.add_parser("run")
    p.add_argument("names")
    p.add_argument("out")
    p.add_argument("--jobs", type=int, default=2)
    p = sub.add_parser("lines")
    p.add_argument("paths", nargs="*", help="only these test paths, merged into the existing sweep-lines.json")
    p = sub.add_parser("show")
    p.add_argument("names", nargs="+")
    p = sub.add_parser("sweep")
    p.add_argument("names")
    p.add_argument("out")
    p.add_argument("--jobs", type=int, default=1)
    p = sub.add_parser("check")
    p.add_argument("names", help="a file of mutant names, one a line, or names separated by commas")
    p.add_argument("paths", nargs="+", help="test files or folders, relative to ./mutants")
    p = sub.add_parser("score")
    p.add_argument("out")
    args = parser.parse_args()
    if args.cmd == "generate":
        generate()
    elif args.cmd == "sample":
        sample(args.k, args.seed)
    elif args.cmd == "run":
        run(args.names, args.out, args.jobs)
    elif args.cmd == "lines":
        lines(args.paths)
    elif args.cmd == "show":
        show(args.names)
    elif args.cmd == "sweep":
        sweep(args.names, args.out, args.jobs)
    elif args.cmd == "check":
        listed = Path(args.names)
        names = listed.read_text().split() if listed.exists() else [n for n in args.names.split(",") if n]
        check(args.paths, names)
    else:
        score(args.out)


if __name__ == "__main__":
    main()
