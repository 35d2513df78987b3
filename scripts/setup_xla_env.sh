#!/usr/bin/env bash
# Create (or reuse) the XLA lane's environment: torch 2.9.0 + torch_xla 2.9.0 on the CPU.
#
#   bash scripts/setup_xla_env.sh            # -> .venv-xla (XLA_VENV=DIR to choose another)
#   PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest tests/xla
#
# No nvidia-* package is installed: PyPI's torch 2.9.0 wheel for Linux x86_64 is the
# CUDA 12.8 build and lists the CUDA runtime as nvidia-* wheels (several GB). We install
# it with --no-deps, add its pure-Python dependencies by hand, and satisfy the dynamic
# loader with generated do-nothing stand-ins for the CUDA libraries
# (scripts/xla_cuda_stubs.py explains why and how). torch.cuda.is_available() is False.
#
# The environment is reused while its stamp matches this script and the stub generator;
# change either (e.g. a version below) and it is rebuilt from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${XLA_VENV:-.venv-xla}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.sdce-xla-stamp"
want=$(cat scripts/setup_xla_env.sh scripts/xla_cuda_stubs.py | sha256sum | cut -d' ' -f1)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "xla env: $VENV is up to date"
  exit 0
fi

start=$(date +%s)
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip install -q --no-input "$@"; }

# 1. The pinned wheels, without their dependency lists (torch's names nvidia-* wheels; torchdata's names torch).
pip --no-deps torch==2.9.0 torch_xla==2.9.0 torchdata==0.11.0
# 2. Their pure-Python dependencies (torch: filelock ... fsspec; torch_xla: absl-py ... requests).
pip filelock "typing-extensions>=4.10" "sympy>=1.13.3" "networkx>=2.5.1" jinja2 "fsspec>=0.8.5" \
    "absl-py>=1.0" numpy pyyaml requests
# 3. What the trainer, the surrogate server and the tests import (none of these depends on torch).
pip "transformers==5.23.0" "tokenizers==0.23.3" "datasets==5.2.0" "safetensors==0.8.0" "tqdm>=4.66" \
    "grpcio==1.85.1" "grpcio-health-checking==1.85.1" "grpcio-reflection==1.85.1" "protobuf==7.36.2" \
    "fastapi==0.165.0" "uvicorn==0.54.0" "msgpack==1.2.4" "prometheus-client==0.26.0" \
    "pytest==9.2.0" "pytest-timeout==2.4.0"
# 4. The CUDA stand-ins, preloaded by a .pth file.
"$VENV/bin/python" scripts/xla_cuda_stubs.py "$VENV"

if "$VENV/bin/python" -m pip list 2>/dev/null | grep -i '^nvidia-'; then
  echo "xla env: an nvidia-* package got installed; it must not" >&2
  exit 1
fi
PJRT_DEVICE=CPU "$VENV/bin/python" - <<'PY'
import torch, torch_xla
x = torch.arange(4.0, device=torch_xla.device()) * 2
torch_xla.sync()
assert x.cpu().tolist() == [0.0, 2.0, 4.0, 6.0]
assert not torch.cuda.is_available()
print(f"xla env: torch {torch.__version__}, torch_xla {torch_xla.__version__}, PJRT CPU works")
PY
echo "$want" > "$STAMP"
echo "xla env: $VENV created in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
