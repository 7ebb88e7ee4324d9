# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned for the dev install only (a CPU wheel); the library itself asks for a range.
TORCH_PIN := torch==2.13.0

.PHONY: train test venv lint bench mutate

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
# dev holds the Ray launcher (tests/app/test_cluster.py's Ray sweep): hydra-ray-launcher 1.2.2 pins cloudpickle<3,
# so pip settles on joblib 1.5.x (joblib 1.6 needs cloudpickle>=3; scikit-learn takes either).
	$(PY) -m pip install -q -e ".[dev,app]" $(TORCH_PIN)
# DeepSpeed (tests/lightning/test_deepspeed.py): built against the torch above, its kernels left to JIT
	$(PY) -m pip install -q "setuptools>=77" wheel
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.16,<0.20" $(TORCH_PIN)
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PY) -m lightning_adapters.train $(ARGS)

test: venv
	$(PY) -m pytest -q -n 2 --dist loadgroup $(ARGS)

lint: venv
	$(VENV)/bin/ruff check lightning_adapters tests experiments

bench: venv
	$(PY) -m experiments.benchmarks.run $(ARGS)

# Mutation testing (slow, not part of CI; docs/MUTATION.md). MUTANTS='lightning_adapters.core.state.*' limits the
# run to matching mutant names; MUTATE_JOBS sets the worker count. Results stay in ./mutants (git-ignored).
MUTATE_JOBS ?= 1
mutate: venv
	nice -n 19 $(PY) -m mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(PY) -m mutmut results
