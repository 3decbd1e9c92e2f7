#!/usr/bin/env bash
# One node, several GPUs (or CPU processes with gloo):
#   scripts/train_torchrun.sh CONFIG NPROC [KEY=VALUE ...]
# e.g. scripts/train_torchrun.sh configs/demo.yaml 4 training.deepspeed=configs/deepspeed/zero2.json
# Each process gets rank-disjoint, modality-homogeneous batches; idle modality embeddings get a
# zero-weighted loss term, so DDP needs no find_unused_parameters.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG NPROC [KEY=VALUE ...]}
NPROC=${2:?usage: $0 CONFIG NPROC [KEY=VALUE ...]}
shift 2
exec torchrun --standalone --nproc_per_node "$NPROC" -m umbrella.cli train -c "$CONFIG" "$@"
