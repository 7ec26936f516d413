#!/usr/bin/env bash
# Copy this working tree (tracked and untracked, not ignored files) to every worker and install podformer
# with jax[tpu] there.   TPU_NAME=pf ZONE=us-central2-b tpu_scripts/setup.sh
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
cd "$(dirname "$0")/.."

tarball="${TMPDIR:-/tmp}/podformer-$TPU_NAME.tar.gz"
if [ "$DRY_RUN" = 1 ]; then
  echo "+ git ls-files -co --exclude-standard | tar -czf $tarball -T -"
else
  git ls-files -z -co --exclude-standard | tar --null -czf "$tarball" -T -
fi
for node in $(nodes); do
  gc compute tpus tpu-vm scp "$tarball" "$node:podformer.tar.gz" --zone="$ZONE" --worker=all
done
on_workers "set -e; mkdir -p ~/$REMOTE_DIR && tar -xzf ~/podformer.tar.gz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR \
&& python3 -m pip install -q -U pip && python3 -m pip install -q -e '.[tpu]' \
&& python3 -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
