#!/usr/bin/env bash
# Deletes a Cloud TPU VM or slice (checkpoints in a mounted bucket are kept).
#
# Usage:
#   launch/tpu/delete.sh NAME ZONE
# Environment: PROJECT (default: gcloud's configured project).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
NAME="$1"
ZONE="$2"
args=(--zone="${ZONE}" --quiet)
if [[ -n "${PROJECT:-}" ]]; then
  args+=(--project="${PROJECT}")
fi
set -x
gcloud compute tpus tpu-vm delete "${NAME}" "${args[@]}"
