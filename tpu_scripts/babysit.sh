#!/usr/bin/env bash
# Keep a (spot) slice training until the command finishes: when the slice is preempted, delete it, create
# it again, set it up and relaunch; the run resumes from its latest checkpoint. Exits with the run's code.
#   TPU_NAME=pf ZONE=us-central2-b PROVISIONING=spot tpu_scripts/babysit.sh python3 train.py --workdir=gs://b/run
# DRY_RUN=1 prints one round: the state query and the recovery it would run.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
here="$(dirname "$0")"
POLL_SECONDS="${POLL_SECONDS:-60}"

# A failed step (no spot capacity, say) is retried at the next poll, not fatal.
relaunch() {
  "$here/delete.sh" || true # may already be gone
  "$here/create.sh" && "$here/setup.sh" && "$here/run.sh" "$@" || echo "babysit: relaunch failed; retrying"
}

if [ "$DRY_RUN" = 1 ]; then
  tpu_state
  relaunch "$@"
  exit 0
fi

state=$(tpu_state)
if [ "$state" = ACTIVE ] || [ "$state" = READY ]; then
  "$here/run.sh" "$@"
else
  echo "babysit: $TPU_NAME is $state; (re)creating it"
  relaunch "$@"
fi
while true; do
  sleep "$POLL_SECONDS"
  state=$(tpu_state)
  case "$state" in
    ACTIVE | READY)
      # 75: the run saved a checkpoint on SIGTERM (e.g. a maintenance event) but the slice survived.
      code=$(WORKER=0 on_workers "cat ~/podformer-logs/$RUN_NAME.exit 2>/dev/null || true" | awk 'NR == 1') || true
      case "$code" in
        "") ;;
        75) echo "babysit: the run was preempted (exit 75); relaunching" && "$here/run.sh" "$@" || true ;;
        *) echo "babysit: the run exited $code"; exit "$code" ;;
      esac
      ;;
    PREEMPTED | TERMINATED | STOPPED | FAILED | SUSPENDED | NOT_FOUND)
      echo "babysit: $TPU_NAME is $state; (re)creating it"
      relaunch "$@"
      ;;
    *) echo "babysit: $TPU_NAME is $state; waiting" ;;
  esac
done
