# Two commands: `make run` starts the app, `make test` runs every test. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CHROMIUM ?= /usr/bin/chromium

.PHONY: run test bench clean deps deploy

$(VENV)/.deps-app: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# The local engine (torch, diffusers, peft): optional for the app, installed by both commands.
# TORCH pins the build; the CPU wheel is enough for the tiny test model.
TORCH ?= torch==2.13.0
$(VENV)/.deps-local: $(VENV)/.deps-app requirements-local.txt
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements-local.txt
	touch $@

$(VENV)/.deps-dev: $(VENV)/.deps-local requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq chromium

deps: $(VENV)/.deps-dev

run: $(VENV)/.deps-local
	$(PY) app.py $(ARGS)

test: $(VENV)/.deps-dev $(CHROMIUM)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.deps-dev
	$(PY) -m benchmarks.dataset_prep
	$(PY) -m benchmarks.compare_latency
	$(PY) -m benchmarks.local_train
	$(PY) -m benchmarks.local_train_gpu
	$(PY) -m benchmarks.results_history
	$(PY) -m benchmarks.load

deploy: $(VENV)/.deps-app
	$(PY) -m tools.deploy $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
