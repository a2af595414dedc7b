#!/usr/bin/env bash
# Entry point of the RayJobs rayjob-repro.yaml (`repro`) and rayjob-retrain.yaml (`retrain`).
# It runs on the Ray head of the RayCluster `dinoalign`, inside the dinoalign image
# (infra/docker/Dockerfile: the repository at /opt/dinoalign with its environment). S3 and
# MLflow settings come from the ConfigMap dinoalign-env, keys from the Secret dinoalign-s3.
#
# Optional: DINOALIGN_GIT_REMOTE (+ DINOALIGN_GIT_BRANCH, default main) with push access
# (e.g. an SSH deploy key mounted from a Secret and GIT_SSH_COMMAND): the job starts from
# that branch and commits the pointer files it changed (dvc.lock, params.yaml, data/*.dvc,
# retrain/) back to it, so the next job continues where this one stopped.
set -euo pipefail
cd /opt/dinoalign
mode=${1:?usage: run-in-cluster.sh repro|retrain}
branch=${DINOALIGN_GIT_BRANCH:-main}
export RAY_ADDRESS=auto  # the entrypoint runs on a node of the cluster: join it

if [ -n "${DINOALIGN_GIT_REMOTE:-}" ]; then
  git fetch --quiet "$DINOALIGN_GIT_REMOTE" "$branch"
  git checkout --quiet -B "$branch" FETCH_HEAD
fi
# this checkout's DVC remote: the bucket on the cluster's S3 (keys stay in .dvc/config.local)
dinoalign infra dvc-remote cluster "s3://${DINOALIGN_STACK_BUCKET}/dvc" --default
dvc pull --allow-missing  # earlier outputs; anything missing is recomputed by repro

case "$mode" in
  repro)
    dvc repro
    dvc push
    ;;
  retrain)
    dinoalign retrain --new "${DINOALIGN_INCOMING:?set DINOALIGN_INCOMING in the ConfigMap}"
    ;;
  *)
    echo "run-in-cluster.sh: unknown mode $mode (repro|retrain)" >&2
    exit 2
    ;;
esac

if [ -n "${DINOALIGN_GIT_REMOTE:-}" ]; then
  git add dvc.lock params.yaml data retrain 2>/dev/null || git add dvc.lock params.yaml
  if ! git diff --cached --quiet; then
    git -c user.name=dinoalign -c user.email=dinoalign@localhost \
      commit --quiet -m "dinoalign $mode on the cluster ($(date -u +%Y-%m-%dT%H:%MZ))"
    git push --quiet "$DINOALIGN_GIT_REMOTE" "HEAD:$branch"
  fi
fi
