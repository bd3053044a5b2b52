#!/usr/bin/env bash
# Run gemma_jax on a Cloud TPU VM slice (single- or multi-host) with gcloud.
#
#   launch/tpu_vm.sh create                    # make the slice
#   launch/tpu_vm.sh setup                     # copy this checkout to every worker and pip install it
#   launch/tpu_vm.sh run gemma-jax generate --distributed --ckpt /data/gemma-2-27b --mesh tensor=-1 --prompt "..."
#   launch/tpu_vm.sh delete                    # give it back
#
# Settings come from the environment: TPU_NAME, ZONE, PROJECT, ACCELERATOR (e.g. v5litepod-16),
# RUNTIME (e.g. v2-alpha-tpuv5-lite), SPOT=1 for preemptible capacity. `run` starts the same
# command on all workers at once; jax.distributed.initialize() (--distributed) finds the peers,
# and only process 0 prints.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
project=(${PROJECT:+--project="$PROJECT"})
tpu=(gcloud compute tpus tpu-vm)
remote_dir=gemma_jax

case "${1:-}" in
  create)
    "${tpu[@]}" create "$TPU_NAME" --zone="$ZONE" "${project[@]}" \
      --accelerator-type="${ACCELERATOR:?set ACCELERATOR}" --version="${RUNTIME:?set RUNTIME}" ${SPOT:+--spot}
    ;;
  setup)
    root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
    archive=$(mktemp --suffix=.tar.gz)
    git -C "$root" archive --format=tar.gz -o "$archive" HEAD
    "${tpu[@]}" scp "$archive" "$TPU_NAME":gemma_jax.tar.gz --zone="$ZONE" "${project[@]}" --worker=all
    "${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" "${project[@]}" --worker=all --command \
      "rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf gemma_jax.tar.gz -C $remote_dir && pip install -U 'jax[tpu]' && pip install -e ./$remote_dir"
    rm -f "$archive"
    ;;
  run)
    shift
    [ $# -gt 0 ] || { echo "usage: $0 run COMMAND [ARGS...]" >&2; exit 2; }
    "${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" "${project[@]}" --worker=all --command "cd $remote_dir && $(printf '%q ' "$@")"
    ;;
  delete)
    "${tpu[@]}" delete "$TPU_NAME" --zone="$ZONE" "${project[@]}" --quiet
    ;;
  *)
    echo "usage: $0 {create|setup|run COMMAND...|delete}" >&2
    exit 2
    ;;
esac
