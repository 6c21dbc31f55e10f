#!/usr/bin/env bash
# Cloud TPU pod slice: run the same command on every worker.
#   bash launch/tpu_pod.sh my-tpu us-central2-b gs://bucket/runs/base configs/pretrain.py:base
set -euo pipefail
TPU=$1; ZONE=$2; WORKDIR=$3; CONFIG=${4:-configs/pretrain.py:base}
shift $(( $# > 4 ? 4 : $# ))
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd cmal-jax && pip install -r requirements.txt 'jax[tpu]==0.10.2' &&
  python -m cmal_jax.main --config=$CONFIG --workdir=$WORKDIR $*"
