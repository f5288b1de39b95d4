#!/usr/bin/env bash
# Copies this repository to every host of a TPU VM slice and installs it there.
#
# Usage:
#   launch/tpu/setup.sh NAME ZONE
#   REPO_URL=https://github.com/you/replaid-jax.git REPO_REF=main launch/tpu/setup.sh NAME ZONE
#
# Without REPO_URL the committed HEAD of this checkout (`git archive`, so no
# uncommitted changes and no runs/) is copied to every worker; with REPO_URL
# each worker clones it. On each worker the code lands in REMOTE_DIR (default
# ~/replaid-jax), a virtual environment in REMOTE_DIR/.venv, and
# `pip install -e ".[tpu]"` installs JAX for TPU (after Python 3.11 where the
# image has an older one). Environment: PROJECT, REMOTE_DIR, REPO_URL, REPO_REF
# (default main), PYTHON (default python3).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
NAME="$1"
ZONE="$2"
REMOTE_DIR="${REMOTE_DIR:-replaid-jax}"
REPO_REF="${REPO_REF:-main}"
PYTHON="${PYTHON:-python3}"
gargs=(--zone="${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then
  gargs+=(--project="${PROJECT}")
fi

if [[ -z "${REPO_URL:-}" ]]; then
  cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
  archive="$(mktemp -t replaid-jax-XXXXXX.tar.gz)"
  trap 'rm -f "${archive}"' EXIT
  git archive --format=tar.gz -o "${archive}" HEAD
  gcloud compute tpus tpu-vm scp "${archive}" "${NAME}:replaid-jax.tar.gz" --worker=all "${gargs[@]}"
  fetch="rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf replaid-jax.tar.gz -C ${REMOTE_DIR}"
else
  fetch="rm -rf ${REMOTE_DIR} && git clone --depth=1 --branch=${REPO_REF} ${REPO_URL} ${REMOTE_DIR}"
fi

# The project needs Python >= 3.11; the Ubuntu 22.04 TPU images ship 3.10, so 3.11 comes from the deadsnakes PPA.
install="PY=${PYTHON}
if ! \${PY} -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  sudo apt-get update -qq && sudo apt-get install -y -qq software-properties-common
  sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -qq
  sudo apt-get install -y -qq python3.11 python3.11-venv
  PY=python3.11
fi
cd ${REMOTE_DIR} && \${PY} -m venv .venv && . .venv/bin/activate && pip install -q -U pip
pip install -q -e '.[tpu]'
python -c 'import jax; print(jax.process_index(), jax.local_devices())'"

gcloud compute tpus tpu-vm ssh "${NAME}" --worker=all "${gargs[@]}" --command="set -e
${fetch}
${install}"
