"""Every shell command in the README runs, exactly as written, shortened only by appended arguments.

The commands are read from the fenced shell blocks of ``DOCS`` (```` ```bash ````, ``sh``, ``shell``,
``console``, and unlabelled blocks; label a block ``text`` when it is not meant to be run). Each one must match
exactly one rule of ``RULES``: a full-match pattern on the command as written, and the arguments appended to
shorten it (``trainer.fast_dev_run=true``, ``--quick``, ``ARGS=...``). Nothing is removed or replaced, and no rule
may touch an output path or a sweep directory, so a command runs with the default relative paths, in a fresh
copy of the repository (its ``logs/`` and outputs stay there). A command added to a README later fails
``test_every_readme_command_has_one_rule`` until it gets a rule here. Placeholders such as ``<time>`` are filled
from what the commands before them wrote (``PLACEHOLDERS``).

``make`` commands get ``-o .venv/.installed``: the copy's ``.venv`` is the environment running these tests (which
CI's ``make test`` has just built), and ``-o`` tells make not to rebuild it. ``make test`` would run this very
test again, so it runs with ``ARGS=--collect-only ...``: the target, its pytest options and the collection of a
test module are exercised, the tests themselves are not.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.app.conftest import ROOT

DOCS = ("README.md", "experiments/sweep_example/README.md")
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh", ""}
MAKE = ("-o", ".venv/.installed")  # never rebuild the environment the tests run in (see the module docstring)
# A tiny random Bert reading bytes: every piece of the app is built and stepped, in seconds.
TINY = ("model=tiny_bert", "trainer.fast_dev_run=true")
# The default job on its real pretrained encoder, for a few batches.
FEW_BATCHES = (
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
)


@dataclass(frozen=True)
class Rule:
    """How one README command is shortened for CI.

    Attributes:
        pattern: Full-match regex on the command as written (comment removed, arguments joined by one space).
        append: Arguments appended to the command, only ever to make it shorter.
        why: What the appended arguments do.
        timeout: Seconds the shortened command may take.
        default_job: The command runs the default job: its stderr must hold none of ``AVOIDABLE_WARNINGS``.
    """

    pattern: str
    append: tuple[str, ...]
    why: str
    timeout: int = 300
    default_job: bool = False


RULES = (
    Rule(
        r"make train",
        (*MAKE, "ARGS=" + " ".join(FEW_BATCHES)),
        "the default job (pretrained MiniLM, VADER) for 2 training batches",
        default_job=True,
    ),
    Rule(
        r"make test",
        (*MAKE, "ARGS=--collect-only -q tests/app/test_configs.py"),
        "runs the target and collects one test module: running the suite here would run this test again",
    ),
    Rule(
        r"make bench",
        (*MAKE, "ARGS=--quick --methods lora --workloads encoder --no-memory"),
        "the harness's smoke mode on one method and workload",
    ),
    Rule(
        r"python -m experiments\.benchmarks\.run --methods [\w ]+ --workloads [\w ]+",
        ("--quick", "--no-memory"),
        "the harness's smoke mode",
    ),
    Rule(r"python -m lightning_adapters\.train", FEW_BATCHES, "the default job for 2 batches", default_job=True),
    Rule(
        r"python -m lightning_adapters\.train -m .*logger=.*", TINY, "every job of the sweep on a tiny model, one step"
    ),
    Rule(
        r"python -m lightning_adapters\.train -m (?!.*logger=).*",
        (*TINY, "logger=csv"),
        "every job of the sweep on a tiny model, one step; CSV instead of one W&B run per job (W&B in a multirun: "
        "tests/app/test_first_contact.py)",
    ),
    Rule(
        r"python -m lightning_adapters\.train (?!-m )(?!.*hparams_search).*",
        TINY,
        "the run on a tiny model, one step",
    ),
    Rule(
        r"python -m lightning_adapters\.train hparams_search=lora_optuna",
        (*TINY, "hydra.sweeper.n_trials=2"),
        "two Optuna trials on a tiny model, one step each",
    ),
    Rule(r"python experiments/collect_sweep\.py .*", (), "reads the sweep the commands before it ran", timeout=120),
    Rule(
        r"python -m lightning_adapters\.eval ckpt_path=logs/train/runs/<run>/\S+",
        ("trainer.limit_test_batches=2",),
        "tests the adapter of the default job the commands before it trained, on 2 test batches",
    ),
    Rule(
        r"python experiments/lightning_cli/train\.py fit --config experiments/lightning_cli/config\.yaml "
        r"--config experiments/lightning_cli/(lora|loha)\.yaml",
        ("--trainer.fast_dev_run=true",),
        "the LightningCLI example on the pretrained MiniLM for one training and one validation batch",
    ),
)

# Filled in when the command runs, from what the commands before it wrote (in the copy of the repository).
PLACEHOLDERS = {
    "<time>": lambda repo: _newest(repo / "logs" / "train" / "multiruns").name,
    "<date_time>": lambda repo: _newest(repo / "logs" / "train" / "multiruns").name,
    "<directory holding both multiruns>": lambda repo: "logs/train/multiruns",
    "<run>": lambda repo: _newest_run_with_checkpoint(repo).name,
    "<run dir>": lambda repo: f"logs/train/runs/{_newest(repo / 'logs' / 'train' / 'runs').name}",
}
AVOIDABLE_WARNINGS = ("LOAD REPORT", "anonymous setting", "LeafSpec", "Warning:", "WARNING")


def _newest(folder: Path) -> Path:
    runs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not runs:
        raise AssertionError(f"no run in {folder}: run the README commands before this one first")
    return runs[-1]


def _newest_run_with_checkpoint(repo: Path) -> Path:
    runs = repo / "logs" / "train" / "runs"
    done = sorted(p for p in runs.iterdir() if (p / "checkpoints" / "last.ckpt").is_file()) if runs.is_dir() else []
    if not done:
        raise AssertionError(f"no run with checkpoints/last.ckpt in {runs}: run the README's training commands first")
    return done[-1]


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str  # as written, comment removed, whitespace normalised

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{self.text[:60]}"


def extract(doc: str, root: Path = ROOT) -> list[Command]:
    """The shell commands of ``doc``'s fenced shell blocks, in order (``\\`` continuations joined)."""
    text = (root / doc).read_text()
    commands = []
    for block in re.finditer(r"^```([\w-]*)[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        if block.group(1).lower() not in SHELL_LANGS:
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        lines = block.group(2).split("\n")
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            if block.group(1).lower() == "console":
                if not line.startswith("$ "):
                    continue  # output lines
                line = line[2:]
            words = _split(line)
            if words:
                commands.append(Command(doc, first + start, " ".join(words)))
    return commands


def _split(line: str) -> list[str]:
    """Shell words of ``line`` without its comment; ``<placeholder with spaces>`` stays one word."""
    holders = re.findall(r"<[^<>\n]+>", line)
    for n, holder in enumerate(holders):
        line = line.replace(holder, f"__placeholder{n}__", 1)
    words = shlex.split(line, comments=True)
    for n, holder in enumerate(holders):
        words = [w.replace(f"__placeholder{n}__", holder) for w in words]
    return words


COMMANDS = [c for doc in DOCS for c in extract(doc)]


def rules_for(command: Command) -> list[Rule]:
    return [r for r in RULES if re.fullmatch(r.pattern, command.text)]


def test_every_readme_command_has_one_rule() -> None:
    assert COMMANDS, "no shell command found in the READMEs: is the extraction broken?"
    problems = []
    for c in COMMANDS:
        matched = rules_for(c)
        if len(matched) != 1:
            problems.append(f"{c.doc}:{c.line}: {c.text!r} matches {len(matched)} rules of tests/app/test_readme.py")
        for holder in re.findall(r"<[^<>]+>", c.text):
            if holder not in PLACEHOLDERS:
                problems.append(f"{c.doc}:{c.line}: placeholder {holder} has no entry in PLACEHOLDERS")
    assert not problems, "\n".join(problems) + "\nAdd a Rule (pattern -> appended shortening arguments) for each."


def test_every_rule_is_used() -> None:
    unused = [r.pattern for r in RULES if not any(re.fullmatch(r.pattern, c.text) for c in COMMANDS)]
    assert not unused, f"rules no README command matches any more (remove them): {unused}"


def test_no_rule_overrides_a_path() -> None:
    for rule in RULES:
        for arg in rule.append:
            assert not re.search(r"(^|\s)(paths\.|hydra\.(run|sweep)\.|[\w.]*dir=|--out\b)", arg), (rule, arg)


def test_extraction_reads_continuations_comments_and_placeholders(tmp_path: Path) -> None:
    doc = tmp_path / "DOC.md"
    doc.write_text(
        "text\n```bash\nmake train   # the default job\npython x.py -m a=1 \\\n    b=2\n\n# a comment\n```\n"
        "```python\nimport os\n```\n```console\n$ python y.py <some dir>\noutput line\n```\n"
    )
    got = [(c.line, c.text) for c in extract("DOC.md", root=tmp_path)]
    assert got == [(3, "make train"), (4, "python x.py -m a=1 b=2"), (13, "python y.py <some dir>")]


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, str]]]:
    """One fresh copy of the repository per README (its commands share state, e.g. a sweep and its collection),
    with the environment a user has after ``make``: the tests' venv as ``.venv`` and on ``PATH``, no W&B login."""
    out = {}
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PYTEST_", "HF_HUB_OFFLINE"))}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    ignore = shutil.ignore_patterns(".git", ".venv", "logs", "__pycache__", "*.egg-info", ".*_cache", "wandb")
    for doc in DOCS:
        repo = tmp_path_factory.mktemp("repo") / "lightning_adapters"
        shutil.copytree(ROOT, repo, ignore=ignore)
        (repo / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
        out[doc] = (repo, {**env, "PYTHONPATH": str(repo)})
    return out


def _summaries(repo: Path) -> set[Path]:
    return set((repo / "logs").rglob("summary.json")) if (repo / "logs").is_dir() else set()


@pytest.mark.slow
@pytest.mark.xdist_group("readme")
@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command_runs(command: Command, copies) -> None:
    (rule,) = rules_for(command)
    repo, env = copies[command.doc]
    text = command.text
    for holder, fill in PLACEHOLDERS.items():
        if holder in text:
            text = text.replace(holder, fill(repo))
    argv = [*_split(text), *rule.append]
    before = _summaries(repo)
    proc = subprocess.run(
        ["bash", "-c", shlex.join(argv)], cwd=repo, env=env, capture_output=True, text=True, timeout=rule.timeout
    )
    shown = f"{shlex.join(argv)}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, shown
    assert "Traceback" not in proc.stderr, shown
    for path in _summaries(repo) - before:  # every job the command ran finished
        assert json.loads(path.read_text())["status"] == "ok", (path, shown)
    if rule.default_job:
        assert len(_summaries(repo) - before) == 1, shown
        noisy = [line for line in proc.stderr.splitlines() if any(w in line for w in AVOIDABLE_WARNINGS)]
        assert not noisy, "\n".join(noisy)
        assert "run directory    logs/train/runs/" in proc.stdout and "la.load_peft(" in proc.stdout, shown
