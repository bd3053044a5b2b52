#!/usr/bin/env bash
# Start N cooperating processes on this machine, each with D fake CPU devices, joined through
# jax.distributed with gloo collectives: the same code path as a multi-host TPU pod.
#
#   launch/local.sh N D -- gemma-jax generate --ckpt DIR --mesh data=2,tensor=4 --prompt "..."
#
# Process 0's output goes to this terminal; the others' to $LOG_DIR/process_I.log. stdout carries only
# what the command prints: gloo's "[Gloo] Rank ... connected" lines go to stderr (gemma_jax/distributed.py).
# Exits non-zero if any process fails.
set -euo pipefail
if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND [ARGS...]" >&2
  exit 2
fi
num=$1 devices=$2
shift 3
port=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d)}
pids=()
for ((i = 0; i < num; i++)); do
  run=(env JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices"
       GEMMA_JAX_COORDINATOR="127.0.0.1:$port" GEMMA_JAX_NUM_PROCESSES="$num" GEMMA_JAX_PROCESS_ID="$i" "$@")
  # Process 0 keeps this script's stdin (a background job would otherwise read /dev/null), e.g. for --prompt -.
  if [ "$i" = 0 ]; then "${run[@]}" <&0 & else "${run[@]}" > "$log_dir/process_$i.log" 2>&1 & fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
[ "$status" = 0 ] || echo "a process failed (status $status); logs in $log_dir" >&2
exit "$status"
