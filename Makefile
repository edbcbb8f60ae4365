# One-command setup and checks. Every target installs what it needs first.
#   make setup   create .venv/ with the CPU stack (torch CPU, vLLM CPU build, Ray, ...); idempotent
#   make test    the whole test suite (what CI runs; ~34 min on 2 cores; the 25 slowest tests listed last)
#   make test-fast  the inner loop: every package, without the `slow` tests (~570 tests, < 5 min on 2 cores)
#   make lint    ruff, and the import contracts of pyproject.toml [tool.importlinter] (lint-imports)
#   make bench   every benchmark under bench/, each printing one JSON line last
#   make demo    the embedded default: warm-start + FIPO on the built-in task, tiny model, CPU; then evaluate
#                and plot into outputs/demo/.  `make demo ALGO=dapo` runs the DAPO baseline (outputs/demo_dapo);
#                DEMO_ARGS passes Hydra overrides, e.g. `make demo DEMO_ARGS="trainer.total_steps=10"`
#   make job     the cluster path on this machine: a local Ray head with token auth, `ray job submit` of a
#                2-step run into outputs/job, then only that head stopped (tools/job.sh; JOB_ARGS
#                passes Hydra overrides, JOB_OUT the output folder)
#   make cluster-demo  several machines on this one: a Ray head and two worker nodes (a `ray start` session
#                each, tools/local_cluster.py), a 3-step run submitted with `ray job submit`, learner
#                and engines on separate nodes; prints where every actor ran, then stops only that cluster
#                (CLUSTER_ARGS passes Hydra overrides; the run is in outputs/cluster/run)
# No variable needs exporting: the run's environment is in the config (cluster.env, orchestration/cluster/env.py).
SHELL := /bin/bash
PY    := .venv/bin/python
UV    := .tools/bin/uv
STAMP := .venv/.installed
# uv does not read pip's config: pass the local torch wheel folder only where the machine has one.
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links "$(PIP_FIND_LINKS)",)
EXTRAS ?= cpu,dev
export PYTHONDONTWRITEBYTECODE := 1
ALGO      ?= fipo
DEMO_ARGS ?=

.PHONY: setup test test-fast lint bench demo job cluster-demo clean
setup: $(STAMP)

$(UV):
	python3 -m pip install -q --disable-pip-version-check --target .tools uv==0.13.9

$(STAMP): pyproject.toml .ci/excludes.txt | $(UV)
	$(UV) venv -q --allow-existing --python python3.11 .venv
	$(UV) pip install -q --python $(PY) --compile-bytecode $(FIND_LINKS) \
	    --excludes .ci/excludes.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q --durations=25

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	.venv/bin/lint-imports

# The CPU benchmarks (bench/gpu_suite.py is the GPU measurement suite: see bench/RESULTS.md).
BENCHES := future_kl rollout reward learner weight_sync pipeline plan
bench: setup
	@for b in $(BENCHES); do echo "== python -m bench.$$b"; $(PY) -m bench.$$b || exit 1; done

demo: setup
	$(PY) -m tools.demo algorithm=$(ALGO) $(DEMO_ARGS)

job: setup
	bash tools/job.sh

cluster-demo: setup
	$(PY) -m tools.local_cluster demo $(CLUSTER_ARGS)

clean:
	rm -rf .venv .tools outputs .pytest_cache .ruff_cache
