# `make demo` and `make test` each set up what they need first (a .venv inside the repo).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
DEMO_DIR ?= outputs/demo
comma := ,
space := $(subst ,, )

.PHONY: install test test-slow mutate demo lint bench clean

install: $(STAMP)

# The torch pair is pinned: torchvision must match torch's build exactly.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev,prepare,tensorboard,cluster,search]'
	touch $@

# Skip reasons are printed (-rs, pyproject.toml); tests marked slow are left to `make test-slow`.
test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

lint: install
	$(VENV)/bin/ruff check agree tests scripts
	$(VENV)/bin/ruff format --check agree tests scripts

# Mutation testing ([tool.mutmut] in pyproject.toml: the pure modules and their fast tests); not part
# of `make test`. The tool is pinned here, outside the dev install. MUTANTS picks mutmut's names
# (globs): by default the modules that fit 30 minutes on 2 shared cores; MUTANTS='*' runs every module
# of [tool.mutmut], MUTANTS='agree.retrieval.rerank.*' one. Survivors: docs/mutation-testing.md.
MUTMUT := mutmut==3.8.1
MUTANTS ?= agree.model.losses.* agree.retrieval.metrics.*
mutate: install
	$(PY) -m pip install --quiet '$(MUTMUT)'
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 $(foreach m,$(MUTANTS),'$(m)')
	$(VENV)/bin/mutmut export-cicd-stats
	cat mutants/mutmut-cicd-stats.json
	$(VENV)/bin/mutmut results

demo: install
	$(PY) -m agree.demo output_dir=$(DEMO_DIR)

# RELEASE_DIR=PATH/EasyNLP/examples/agree adds the side by side with the release's scripts
bench: install
	$(PY) scripts/bench_training_step.py
	$(PY) scripts/bench_device.py
	$(PY) scripts/bench_retrieval.py --skip-large
	$(PY) scripts/bench_release.py $(if $(RELEASE_DIR),--release-dir $(RELEASE_DIR))
	$(PY) scripts/bench_evaluate_steps.py

# Removes only the folders the demo and the data generator made (they carry a marker file), when
# they hold nothing else (docs/reliability.md); training runs, evaluations and the user's data are kept.
clean:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m agree.folders \
		'remove=[$(subst $(space),$(comma),$(strip $(DEMO_DIR) $(wildcard data/*)))]'
