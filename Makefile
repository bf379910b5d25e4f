# marl-forensics: `make demo` (install + train + evaluate), `make test` (default test suite).
# Everything runs from a virtual environment in .venv, created on first use from python3.11+.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_RUN := runs/simple_spread_3-maddpg-seed0

.PHONY: install demo test test-slow sweep-smoke lint bench gpu-check

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 required, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Train MADDPG on Simple Spread N=3 (discrete actions, CPU), evaluate the checkpoint over
# 500 greedy episodes, then the forensics loop: the paper's paired worst-action protocol on
# 100 seeds, clean calibration episodes of other seeds, the log-only models fitted on clean
# episodes of a third set of seeds (their fused verdict is diagnose's default), diagnose, and
# the accuracy tables.
# Re-running resumes training and recording (finished parts are skipped).
demo: install
	$(BIN)/forensics train train.eval_episodes=0
	$(BIN)/forensics evaluate-policy $(DEMO_RUN) --episodes 500
	$(BIN)/forensics rollout $(DEMO_RUN) -o stores/demo-worst --seeds 0:100 --no-progress
	$(BIN)/forensics rollout $(DEMO_RUN) -o stores/demo-clean --seeds 100000:100500 \
	  --no-progress attack=none
	$(BIN)/forensics rollout $(DEMO_RUN) -o stores/demo-fit --seeds 200000:200500 \
	  --no-progress attack=none
	$(BIN)/forensics fit-models $(DEMO_RUN) -c stores/demo-fit
	$(BIN)/forensics diagnose stores/demo-worst -c stores/demo-clean --no-progress
	$(BIN)/forensics evaluate stores/demo-worst/diagnosis --long stores/demo-worst/logonly.csv

# The default suite (slow tests excluded, see pyproject). Exit status 5 means pytest
# collected no tests: a broken suite, not a pass, so it fails with a message.
test: install
	$(BIN)/pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

# Long end-to-end runs marked @pytest.mark.slow; none collected (exit 5) is fine here.
test-slow: install
	$(BIN)/pytest -q -m slow; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test-slow: no slow tests"; exit 0; fi; \
	exit $$status

# Compose, validate and build every env × algo × attack config (the whole product; the
# default suite composes every pair of options).
sweep-smoke: install
	$(BIN)/pytest -q tests/test_configs.py -k combination -m slow

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Training throughput (env-steps/s) against a step-by-step PettingZoo loop, same networks;
# recording the N=5 paired protocol and diagnosing an N=5 store (Stage 1 + 2), each against
# a per-step Python loop in the same run (each script prints its sizes; --help to change them).
bench: install
	$(BIN)/python scripts/benchmark_train.py
	$(BIN)/python scripts/benchmark_train.py --smax 3s_vs_3z
	$(BIN)/python scripts/benchmark_rollout.py
	$(BIN)/python scripts/benchmark_diagnose.py

# The device check on a machine with a GPU (docs/gpu.md): numerics against the CPU's stored
# values, then diagnose / training throughput; rows and logs under $(OUT) (default
# ./gpu-check-out).
gpu-check: install
	PYTHON=$(BIN)/python scripts/gpu_check.sh
