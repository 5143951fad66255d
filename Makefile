# The two set-up commands of README.md; each installs everything it needs, in either order:
#   make demo   Python deps into .venv/ and the HumanEvalPack toolchains (the demo evaluates python
#               and js, which needs js-md5), then runs the demo pipeline on an embedded local Ray
#   make test   the same installs, then the tests
#               (all but the `long` tier, whole pipelines killed and rerun, ~12 more minutes, and
#               the `cluster` tier, multi-node and autoscaling clusters, ~16 more minutes)
# CI (.ci/run) runs them as a new user does: `make demo`, `make test`, then `make test-long` and
# `make test-cluster`.

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
SHARED ?= ../shared

.PHONY: setup toolchains demo test test-long test-cluster test-fast

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

toolchains:
	bash scripts/install_toolchains.sh

demo: setup toolchains
	SHARED=$(SHARED) bash scripts/demo.sh

test: setup toolchains
	$(VENV)/bin/pytest -q -m "not cluster and not long"

# End-to-end runs of minutes each: whole pipelines killed mid-run and rerun (local disk and S3).
test-long: setup toolchains
	$(VENV)/bin/pytest -q -m "long and not cluster"

# Ray clusters of their own (ray start): two nodes that share no disk, node loss, autoscaling.
test-cluster: setup toolchains
	$(VENV)/bin/pytest -q -m cluster

# Seconds: no Ray, no compilers, no training.
test-fast: setup
	$(VENV)/bin/pytest -q -m "not ray and not toolchain and not slow"
