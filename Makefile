# codeq developer and CI entry points.  `make test` is the test command (README, .ci/run).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# nvcc 13 lives here on our machines; torch otherwise guesses /usr/local.
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# torch's CUDA wheels are GBs: no second copy in pip's cache (disks here are small).
export PIP_NO_CACHE_DIR ?= 1
PYTEST_ARGS ?=

.PHONY: venv install dev test test-all demo bench clean docs

$(PY):
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); if [ "$${free_kb:-0}" -lt 7000000 ]; then \
	  echo "make: warning: only $$((free_kb / 1024)) MiB free here; the venv with torch needs about 6 GiB" >&2; fi
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

venv: $(PY)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q timm pyyaml tqdm matplotlib wandb pytest ninja pybind11 onnx onnxscript onnxruntime

# The user's install: builds codeq._C (CUDA when torch has CUDA and nvcc is found).
install: venv
	$(PIP) install --no-build-isolation --no-deps .
	cd /tmp && $(abspath $(PY)) -c "import codeq, json; print('codeq.info():', json.dumps(codeq.info()))"

# Editable install for development (rebuild C++ with `make dev` again).
dev: venv
	$(PIP) install --no-build-isolation --no-deps -e .

# The test command.  Fast tests only; `make test-all` adds the slow ones.
test: install
	cd tests && CODEQ_REQUIRE_EXT=1 ../$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS) . ; \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-all: install
	cd tests && CODEQ_REQUIRE_EXT=1 ../$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS) . ; \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "make test-all: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: install
	$(PY) run_training.py --config configs/demo.yaml --device cpu

bench: install
	$(PY) benchmarks/bench_quantizer.py --device cpu --out benchmarks/results/bench_quantizer_cpu.json

clean:
	rm -rf build dist *.egg-info codeq/*.so

# The generated part of the docs: the config reference table of docs/TRAINING.md.
docs:
	PYTHONPATH=. $(if $(wildcard $(PY)),$(PY),python3) -c "from codeq.train.config import write_markdown_table; write_markdown_table('docs/TRAINING.md')"
