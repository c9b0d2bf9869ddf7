# Quick start: `make demo` (sets up .venv, installs, runs the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Data: $ROUTING_ENV_DATA if set, else ../shared/data when it exists (offline copies), else the hub.
ifeq ($(strip $(ROUTING_ENV_DATA)),)
  ifneq ($(wildcard ../shared/data),)
    export ROUTING_ENV_DATA := $(abspath ../shared/data)
  endif
endif

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Without an NVIDIA driver, take the CPU build of torch first; an unpinned torch would pull
	# several GB of CUDA packages. With a GPU, pip resolves torch (CUDA build) from pyproject.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(PY) finetune.py --task arc-easy --method lora-moe --epochs 1 --train-limit 400 --eval-limit 200 --name demo-warmup

test: install
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) runs .pytest_cache
