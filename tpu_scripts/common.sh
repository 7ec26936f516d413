# shellcheck shell=bash
# Sourced by every tpu_scripts/*.sh: parameters (environment variables), the gcloud wrapper, helpers.
set -euo pipefail

TPU_NAME="${TPU_NAME:?set TPU_NAME (the TPU VM, or the queued resource and its node)}"
ZONE="${ZONE:?set ZONE, e.g. us-central2-b (v4), us-east5-a (v5p), us-west4-a (v5e)}"
PROJECT="${PROJECT:-}"                        # '' = gcloud's configured project
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"  # v4-8, v4-32, v5p-128, v5litepod-16, v6e-256, ...
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PROVISIONING="${PROVISIONING:-on-demand}"     # on-demand | spot | reserved
QUEUED="${QUEUED:-0}"                         # 1: create through a queued resource (needed for multislice)
NODE_COUNT="${NODE_COUNT:-1}"                 # slices; > 1 needs QUEUED=1 (nodes TPU_NAME-0, TPU_NAME-1, ...)
RUN_NAME="${RUN_NAME:-train}"                 # names the logs and exit-code file on the workers
REMOTE_DIR="${REMOTE_DIR:-podformer}"         # the checkout on the workers, relative to the home directory
DRY_RUN="${DRY_RUN:-0}"                       # 1: print the gcloud commands instead of running them

case "$PROVISIONING" in on-demand | spot | reserved) ;; *)
  echo "PROVISIONING=$PROVISIONING: use on-demand, spot or reserved" >&2
  exit 2
  ;;
esac
if [ "$NODE_COUNT" -gt 1 ] && [ "$QUEUED" != 1 ]; then
  echo "NODE_COUNT=$NODE_COUNT (multislice) needs QUEUED=1" >&2
  exit 2
fi

# gcloud, or its command line on stdout when DRY_RUN=1.
gc() {
  local args=("$@")
  if [ -n "$PROJECT" ]; then args+=("--project=$PROJECT"); fi
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ gcloud ${args[*]@Q}"
  else
    gcloud "${args[@]}"
  fi
}

# The TPU VM node names: one, or one per slice of a multislice queued resource.
nodes() {
  if [ "$NODE_COUNT" -gt 1 ]; then
    for ((i = 0; i < NODE_COUNT; i++)); do echo "$TPU_NAME-$i"; done
  else
    echo "$TPU_NAME"
  fi
}

# Run a shell command on every worker of every node (WORKER=0 for the first worker only).
on_workers() {
  local node
  for node in $(nodes); do
    gc compute tpus tpu-vm ssh "$node" --zone="$ZONE" --worker="${WORKER:-all}" --command="$1"
  done
}

# ACTIVE, CREATING, PREEMPTED, SUSPENDED, ... or NOT_FOUND.
tpu_state() {
  local state
  if [ "$QUEUED" = 1 ]; then
    state=$(gc compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE" --format='value(state.state)' 2>/dev/null) || state=NOT_FOUND
  else
    state=$(gc compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --format='value(state)' 2>/dev/null) || state=NOT_FOUND
  fi
  echo "${state:-NOT_FOUND}"
}
