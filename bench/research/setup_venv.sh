#!/usr/bin/env bash
# Build (or complete) the venv for bench/research/matrix.py and tests/research/:
# CPU torch 2.13.0, ecospa (editable), and the research libraries x-transformers, torchtune,
# litgpt, torchtitan and torch-pruning, each installed with --no-deps (their declared deps would
# pull a CUDA torch or dozens of unused packages) plus, by hand, exactly the pure-python / CPU
# packages they import at import time.
#
#     bash bench/research/setup_venv.sh /tmp/venv-xt
#
# TORCH_INDEX (optional): an index URL for the CPU torch wheel, e.g.
# https://download.pytorch.org/whl/cpu ; by default pip's configured index is used.
set -euo pipefail

VENV="${1:?usage: setup_venv.sh VENV_PATH}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install --disable-pip-version-check)

check_torch() {
    local v
    v="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    if [ "$v" != "2.13.0+cpu" ]; then
        echo "torch is $v after: $1 (want 2.13.0+cpu)" >&2
        exit 1
    fi
}

# 1. CPU torch first, so that nothing later can pull a CUDA build
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    if [ -n "${TORCH_INDEX:-}" ]; then
        "${PIP[@]}" "torch==2.13.0" --index-url "$TORCH_INDEX"
    else
        "${PIP[@]}" "torch==2.13.0"
    fi
fi
check_torch "torch"

# 2. ecospa (editable) and the test/bench tools (none of these depend on torch's build)
"${PIP[@]}" -e "$ROOT"
"${PIP[@]}" "transformers==5.25.0" "huggingface_hub==2.4.0" pytest "pytest-xdist==3.8.0" hypothesis \
    networkx safetensors numpy
check_torch "ecospa + test tools"

# 3. x-transformers 2.31.10 and what it imports
"${PIP[@]}" --no-deps "x-transformers==2.31.10" "einops==0.8.2" "einx==0.4.3" "frozendict==2.5.1" \
    "loguru==0.7.3" "torch-einops-utils==0.2.0" "packaging"
check_torch "x-transformers"

# 4. torchtune 0.6.1: torchao, and `import torchtune` imports torchtune.data, which imports
#    datasets (pyarrow, pandas, dill, multiprocess, xxhash, huggingface_hub, requests),
#    omegaconf, sentencepiece, tiktoken and blobfile at import time
"${PIP[@]}" --no-deps "torchtune==0.6.1" "torchao==0.11.0" \
    "datasets==5.2.0" "pyarrow==26.0.1" "pandas==3.1.1" "python-dateutil==4.0.0" "six==1.17.0" "tzdata" \
    "dill==0.4.1" "multiprocess==0.70.19" "xxhash==4.1.0" "requests==2.34.2" "certifi" \
    "charset-normalizer" "urllib3" "pyyaml==6.0.4" "tqdm" "fsspec" \
    "omegaconf==2.4.0" "antlr4-python3-runtime==4.9.3" \
    "sentencepiece==0.2.3" "tiktoken==0.14.0" "blobfile==3.3.0"
check_torch "torchtune"

# 5. litgpt 0.5.13: `import litgpt` imports litgpt.api, which imports lightning (-> torchmetrics,
#    lightning_utilities) and psutil
"${PIP[@]}" --no-deps "litgpt==0.5.13" "lightning==2.6.6" "lightning_utilities==0.15.3" \
    "torchmetrics==1.9.0" "psutil==7.2.2"
check_torch "litgpt"

# 6. torchtitan 0.3.0: imports spmd_types (pinned 0.2.3), tyro (docstring_parser) and triton at
#    import time. triton's wheel imports on a CPU-only machine (no GPU is needed to import it).
"${PIP[@]}" --no-deps "torchtitan==0.3.0" "spmd_types==0.2.3" "tyro==1.0.17" "docstring_parser==0.18.0" \
    "triton==3.9.0"
check_torch "torchtitan"

# 7. Torch-Pruning, for the comparison column
"${PIP[@]}" --no-deps "torch-pruning==1.6.1"
check_torch "torch-pruning"

"$VENV/bin/python" - <<'EOF'
import torch, ecospa, x_transformers, torchtune.models.llama3, litgpt.model, torchtitan.models.llama3, torch_pruning
print("ok: torch", torch.__version__, "ecospa", ecospa.__version__)
EOF
