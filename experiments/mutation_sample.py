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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
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
    p = sub.add_parser("score")
    p.add_argument("out")
    args = parser.parse_args()
    if args.cmd == "generate":
        generate()
    elif args.cmd == "sample":
        sample(args.k, args.seed)
    elif args.cmd == "run":
        run(args.names, args.out, args.jobs)
    else:
        score(args.out)


if __name__ == "__main__":
    main()
