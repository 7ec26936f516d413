#!/usr/bin/env bash
# Follow the run's log on worker 0 (WORKER=3 for another, WORKER=all for every worker, interleaved).
#   TPU_NAME=pf ZONE=us-central2-b tpu_scripts/logs.sh
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
WORKER="${WORKER:-0}"
on_workers "tail -n ${LINES:-50} -F ~/podformer-logs/$RUN_NAME.\$(hostname).log"
