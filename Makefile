# Every target sets itself up: a fresh clone needs only python3 (3.10+) and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NPROC ?= 2
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export OMP_NUM_THREADS ?= 1

.PHONY: venv pretrain test soak bench transfer demo-data clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

demo-data: venv
	$(PY) -m data.demo

pretrain: demo-data
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) launch/pretrain.py +stage=simmim
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) launch/pretrain.py +stage=supervised

test: venv
	$(VENV)/bin/pytest -q

soak: venv  # minutes: thousands of steps with repeated kills and relaunches (docs/RELIABILITY.md)
	$(VENV)/bin/pytest -q --soak -m soak

bench: venv
	$(PY) -m scripts.bench

transfer: venv  # the small Table 1 of docs/PERFORMANCE.md: log vs linear CPB across sizes and windows
	$(PY) -m scripts.transfer_table --nproc $(NPROC)

clean:
	rm -rf runs demo_shards .pytest_cache
