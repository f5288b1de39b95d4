#!/usr/bin/env bash
# Runs the same training command on every host of a TPU VM slice.
#
# Usage:
#   launch/tpu/run.sh NAME ZONE CONFIG WORKDIR [more flags for launch/train.py ...]
#   launch/tpu/run.sh replaid-v4 us-central2-b configs/owt_base.py /mnt/bucket/owt \
#       --config.data.train_files='/mnt/bucket/owt/train_*.npy' --config.data.val_files=/mnt/bucket/owt/val.npy
#
# Every worker runs `python launch/train.py --config=CONFIG --workdir=WORKDIR ...`
# at the same time (a multi-host program needs all of them); JAX finds the other
# hosts of the slice by itself. WORKDIR must be one directory shared by all hosts: a bucket
# mounted with gcsfuse at the same path on every worker, or NFS (gs:// URLs are
# not accepted as a workdir: the loop writes through the local file system).
# Each worker's output is streamed to this terminal, prefixed with [wN], and
# written to LOG_DIR/worker-N.log (default logs/NAME/). Ctrl-C ends the local
# ssh sessions; to make sure the remote processes stopped too:
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command='pkill -f launch/train.py'
# Environment: PROJECT, REMOTE_DIR (default replaid-jax), NUM_WORKERS (default:
# read from `gcloud compute tpus tpu-vm describe`), LOG_DIR, ENV_VARS (exported
# on the workers before the run, e.g. "XLA_FLAGS=... LIBTPU_INIT_ARGS=...").
set -euo pipefail

if [[ $# -lt 4 ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
NAME="$1"
ZONE="$2"
CONFIG="$3"
WORKDIR="$4"
shift 4
REMOTE_DIR="${REMOTE_DIR:-replaid-jax}"
LOG_DIR="${LOG_DIR:-logs/${NAME}}"
gargs=(--zone="${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then
  gargs+=(--project="${PROJECT}")
fi

if [[ -z "${NUM_WORKERS:-}" ]]; then
  NUM_WORKERS="$(gcloud compute tpus tpu-vm describe "${NAME}" "${gargs[@]}" --format=json \
    | python3 -c 'import json, sys; print(len(json.load(sys.stdin).get("networkEndpoints", [])) or 1)')"
fi

quoted=""
for arg in "$@"; do
  quoted+=" $(printf '%q' "${arg}")"
done
train="cd ${REMOTE_DIR} && . .venv/bin/activate && ${ENV_VARS:+export ${ENV_VARS} && }PYTHONUNBUFFERED=1 \
python launch/train.py --config=$(printf '%q' "${CONFIG}") --workdir=$(printf '%q' "${WORKDIR}")${quoted}"

mkdir -p "${LOG_DIR}"
echo "running on ${NUM_WORKERS} worker(s) of ${NAME}; logs in ${LOG_DIR}/worker-N.log"
echo "  ${train}"
pids=()
for ((w = 0; w < NUM_WORKERS; w++)); do
  # Ctrl-C reaches every ssh session (they share this terminal's process group).
  (gcloud compute tpus tpu-vm ssh "${NAME}" --worker="${w}" "${gargs[@]}" --command="${train}" 2>&1 \
    | tee "${LOG_DIR}/worker-${w}.log" | sed -u "s/^/[w${w}] /") &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "${pid}" || status=$?
done
exit "${status}"
