# The two commands a newcomer runs: `make run` (a PipelineJob on this machine's CPU) and `make test`.
SHELL := /bin/bash
VENV ?= $(HOME)/.cache/conveyor/venv
export CONVEYOR_VENV := $(VENV)
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: bootstrap run test lint typecheck unit crds cluster cluster-down

bootstrap:
	@bash .ci/bootstrap >/dev/null

run: bootstrap
	$(VENV)/bin/conveyor run

lint: bootstrap
	$(VENV)/bin/ruff check worker operator tests benchmarks
	$(VENV)/bin/ruff format --check worker operator tests benchmarks

typecheck: bootstrap
	$(VENV)/bin/mypy worker/conveyor operator/conveyor_operator

crds: bootstrap
	$(VENV)/bin/conveyor crd --write

test: lint typecheck
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

# A local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager and a pod agent) built from
# pinned Go modules, once per machine (tests/cluster/build.sh). Use: eval "$$(make -s cluster)".
cluster: bootstrap
	@$(PY) -m tests.cluster.controlplane up

cluster-down:
	@$(PY) -m tests.cluster.controlplane down
