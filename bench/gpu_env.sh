# Sourced by the GPU scripts (bench/gpu.sh, bench/gpu_pretrain.sh): picks the Python, installs
# the wheels in .whl/ into /tmp/site (the GPU image has torch but not monai, pydicom, structlog,
# pydantic, nibabel: `pip download --only-binary=:all: --python-version 3.12 --no-deps -d .whl
# monai pydicom structlog pydantic pydantic-core annotated-types typing-inspection nibabel`),
# puts the repository on PYTHONPATH and sets RESULTS ($OUT on the device machine).
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader || echo "no nvidia-smi (CPU run)"
