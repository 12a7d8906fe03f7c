#!/usr/bin/env bash
# Create .venv/ in the repository root and install everything wsbcn_d2 needs.
#
# Safe to re-run: each step is skipped when what it installs is already there.
# Environment:
#   PYTHON               interpreter used to create the venv (default: python3)
#   WSBCN_DETECTRON2     pip requirement for detectron2, e.g.
#                        'git+https://github.com/facebookresearch/detectron2.git'
#                        (default: the PyPI redistribution sal-detectron2==0.7.2,
#                        installed as a cp310 pure-Python wheel; see README)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY="$VENV/bin/python"
[ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
pip_install() {  # quiet; pip's output is shown only when it fails
    local log
    log=$(mktemp)
    if ! "$PY" -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}
has() { "$PY" -c "import $1" >/dev/null 2>&1; }

if ! has "torch, torchvision"; then
    echo "[setup] installing torch 2.14.1 + torchvision 0.29.1"
    pip_install torch==2.14.1 torchvision==0.29.1
fi

# detectron2's runtime requirements (pinned where the 0.7.2 code needs it); timm, the reference
# the BiT ResNetV2 tests compare with; safetensors, for timm's weight files; onnx and onnxruntime,
# for tools/export_model.py.
REQS=(
    "numpy<2" "setuptools<81" "opencv-python-headless<4.12" "omegaconf>=2.1,<2.4"
    "hydra-core>=1.1" "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7" "pycocotools>=2.0.2"
    matplotlib termcolor yacs tabulate cloudpickle tqdm tensorboard black packaging
    pytest "timm>=1.0" safetensors onnx onnxruntime
)
if ! "$PY" - "${REQS[@]}" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
for spec in sys.argv[1:]:
    req = Requirement(spec)
    if version(req.name) not in req.specifier:
        sys.exit(1)
PYEOF
then
    echo "[setup] installing detectron2's runtime requirements"
    pip_install "${REQS[@]}"
fi

if ! has detectron2; then
    if [ -n "${WSBCN_DETECTRON2:-}" ]; then
        echo "[setup] installing detectron2 from $WSBCN_DETECTRON2"
        pip_install --no-build-isolation "$WSBCN_DETECTRON2"
    else
        echo "[setup] installing detectron2 (sal-detectron2==0.7.2, pure Python)"
        SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        pip_install --no-deps --only-binary=:all: --python-version 3.10 \
            --implementation cp --target "$SITE" --upgrade sal-detectron2==0.7.2
        # The wheel also ships upstream's scripts as a top-level 'tools' package,
        # which would shadow this repository's tools/.
        rm -rf "$SITE/tools"
    fi
    has detectron2 || { echo "[setup] detectron2 does not import" >&2; exit 1; }
fi

if ! "$PY" -m pip show -q wsbcn_d2 >/dev/null 2>&1; then
    echo "[setup] installing wsbcn_d2 (editable)"
    pip_install --no-deps --no-build-isolation -e .
fi
# (without detectron2's import-time torch.jit.script deprecation warnings, as tools/_startup.py)
"$PY" -W 'ignore:`torch.jit.script` is deprecated:FutureWarning' \
    -c "import detectron2, torch, wsbcn_d2; print('[setup] ok: torch', torch.__version__, '| detectron2', detectron2.__version__)"
