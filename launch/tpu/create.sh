#!/usr/bin/env bash
# Creates a Cloud TPU VM (one host) or pod slice (several hosts).
#
# Usage:
#   launch/tpu/create.sh NAME ZONE ACCELERATOR_TYPE [RUNTIME_VERSION]
#   launch/tpu/create.sh replaid-v4 us-central2-b v4-32
#   launch/tpu/create.sh replaid-v5e us-west4-a v5litepod-16
#   SPOT=1 launch/tpu/create.sh replaid-v6e us-east5-b v6e-8
#
# ACCELERATOR_TYPE names the slice: v4-N and v5p-N count TensorCores (2 per
# chip, 4 chips per host), v5litepod-N and v6e-N count chips (up to 8 per host
# for v5e/v6e, 4 on multi-host slices). RUNTIME_VERSION defaults by generation.
# Environment: PROJECT (default: gcloud's configured project), SPOT=1 for a
# spot (preemptible) slice, EXTRA_ARGS for further `gcloud` flags (e.g.
# --network=... --reserved). Newer generations in busy zones may need a queued
# resource instead (`gcloud compute tpus queued-resources create`).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
NAME="$1"
ZONE="$2"
ACCELERATOR_TYPE="$3"
case "${ACCELERATOR_TYPE}" in
  v4-*) DEFAULT_VERSION="tpu-ubuntu2204-base" ;;
  v5litepod-*|v5e-*) DEFAULT_VERSION="v2-alpha-tpuv5-lite" ;;
  v5p-*) DEFAULT_VERSION="v2-alpha-tpuv5" ;;
  v6e-*) DEFAULT_VERSION="v2-alpha-tpuv6e" ;;
  *) DEFAULT_VERSION="tpu-ubuntu2204-base" ;;
esac
RUNTIME_VERSION="${4:-${DEFAULT_VERSION}}"

args=(--zone="${ZONE}" --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}")
if [[ -n "${PROJECT:-}" ]]; then
  args+=(--project="${PROJECT}")
fi
if [[ "${SPOT:-0}" == "1" ]]; then
  args+=(--spot)
fi
# shellcheck disable=SC2206  # EXTRA_ARGS is split into words on purpose
extra=(${EXTRA_ARGS:-})

set -x
gcloud compute tpus tpu-vm create "${NAME}" "${args[@]}" "${extra[@]}"
