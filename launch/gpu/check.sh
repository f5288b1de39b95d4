#!/usr/bin/env bash
# The GPU check: bf16 owt_base train step and forward at the largest batch that fits (tokens/s, MFU), bf16 vs
# fp32 loss agreement over 20 steps, and the sampler-step / forward ratio, written as one JSON.
#
# Usage (from anywhere; runs in the repository):
#   launch/gpu/check.sh [OUT.json] [more flags for launch/gpu/check.py ...]
#   launch/gpu/check.sh /tmp/gpu_check.json --batches=16,32,64
#
# When JAX sees no GPU it first installs the [cuda] extra into the current Python environment
# (pip install -e ".[cuda]"; set NO_INSTALL=1 to skip). CONFIG replaces configs/owt_base.py. Exit status 1 when bf16 and fp32 disagree.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python}"
OUT="${1:-gpu_check.json}"
shift || true
if ! "${PYTHON}" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  if [[ -n "${NO_INSTALL:-}" ]]; then
    echo "JAX sees no GPU and NO_INSTALL is set" >&2
    exit 2
  fi
  "${PYTHON}" -m pip install -q -e ".[cuda]"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export PYTHONUNBUFFERED=1
"${PYTHON}" -c 'import jax; print(jax.device_count(), "device(s):", jax.devices()[0].device_kind)'
"${PYTHON}" launch/gpu/check.py --config="${CONFIG:-configs/owt_base.py}" --out="${OUT}" "$@"
