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

.PHONY: install demo test test-portable constraints bench gpu-bundle reproduce clean

install: $(VENV)/.installed

# constraints.txt pins every package to the versions the suite last passed with (`make constraints`
# refreshes it); pyproject.toml keeps ranges for library users.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Without an NVIDIA driver, take the CPU build of torch first; an unpinned torch would pull
	# several GB of CUDA packages. With a GPU, pip resolves torch (CUDA build) from pyproject.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q -c constraints.txt torch; fi
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# After upgrading packages in the venv and passing `make test`: record what passed.
constraints: install
	{ echo "# Versions the test suite last passed with (make constraints); used by make install."; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//' | grep -v '^-e '; } > constraints.txt

# The main job: search layer-group routing on ARC-Easy with MCTS (trains and caches a demo-size
# warm-up checkpoint first when none is cached) and write routing targets + TensorBoard logs.
# THREADS=N caps torch's CPU threads (`make demo THREADS=2` on a shared machine); unset: torch's default.
demo: install
	$(PY) train_rl.py --env layermoe-arc $(if $(THREADS),--threads $(THREADS))

# Benchmarks print JSON; bench/mcts.py also times DeepMind's mctx when the bench extra is installed.
bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/mcts.py
	$(PY) bench/env_step.py
	$(PY) bench/lora_moe_cpu.py
	$(PY) bench/ops.py --out results/bench/ops.json

# What bench/gpu.py needs on an offline GPU machine besides the checkout (wheels, fp16 MiniLM,
# ARC-Easy) in .gpu-bundle/; there: `bash bench/gpu_run.sh` (README "GPU").
gpu-bundle: install
	$(PY) bench/gpu_bundle.py --out .gpu-bundle

# The LayerMoE comparison (3 seeds x lora, lora-moe, the no-search control, the exact oracle with the
# stage-3 setting chosen on dev) on three tasks; many CPU hours at full size, see README "Results".
# Finished stages are skipped on a rerun, also from the records committed under results/runs.
reproduce: install
	for task in arc-easy arc-challenge obqa; do $(PY) -m routing_env.pipeline --task $$task \
		--methods lora,lora-moe,layermoe-router,layermoe-exhaustive \
		--target-form softmax --target-temperature 0.05 --target-balance sinkhorn || exit 1; done

test: install
	$(PY) -m pytest -q -p no:cacheprovider

# The fast tests on ATen's scalar kernels and oneDNN/MKL capped at SSE4.1: other kernels, other
# summation orders, so a comparison that is bit-exact only on this CPU fails here first.
test-portable: install
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 \
		$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
