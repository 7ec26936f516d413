#!/usr/bin/env bash
# Delete the TPU VM (or the queued resource and its nodes). Checkpoints on gs:// are kept.
#   TPU_NAME=pf ZONE=us-central2-b tpu_scripts/delete.sh
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
if [ "$QUEUED" = 1 ]; then
  gc compute tpus queued-resources delete "$TPU_NAME" --zone="$ZONE" --force --quiet
else
  gc compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
fi
