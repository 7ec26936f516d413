#!/usr/bin/env bash
# Create a TPU VM, or a queued resource (QUEUED=1) and wait until it is ACTIVE.
#   TPU_NAME=pf ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 PROVISIONING=spot tpu_scripts/create.sh
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

flags=()
case "$PROVISIONING" in spot) flags+=(--spot) ;; reserved) flags+=(--reserved) ;; esac

if [ "$QUEUED" = 1 ]; then
  if [ "$NODE_COUNT" -gt 1 ]; then
    flags+=(--node-count="$NODE_COUNT" --node-prefix="$TPU_NAME")
  else
    flags+=(--node-id="$TPU_NAME")
  fi
  gc compute tpus queued-resources create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$RUNTIME_VERSION" "${flags[@]}"
  [ "$DRY_RUN" = 1 ] && exit 0
  # A queued resource waits for capacity: minutes to hours. FAILED or SUSPENDED will not recover.
  while true; do
    state=$(tpu_state)
    echo "queued resource $TPU_NAME: $state"
    case "$state" in
      ACTIVE) break ;;
      FAILED | SUSPENDED | NOT_FOUND) exit 1 ;;
    esac
    sleep "${POLL_SECONDS:-30}"
  done
else
  gc compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${flags[@]}"
fi
