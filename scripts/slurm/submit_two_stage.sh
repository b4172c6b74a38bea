#!/usr/bin/env bash
# Queue both stages of an experiment: SimMIM pretraining, then supervised training, which SLURM starts
# only once the SimMIM job has completed successfully (after any requeues) and which initialises from it.
#   scripts/slurm/submit_two_stage.sh [SBATCH OPTIONS --] [HYDRA OVERRIDES FOR BOTH STAGES]
#   scripts/slurm/submit_two_stage.sh --nodes=16 --partition=gpu -- +experiment=swinv2_giant_in22k_ext
# Prints the two job ids.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the batch script runs from the submit directory: the repository root

sbatch_opts=()
if [[ " $* " == *" -- "* ]]; then
    while [[ $1 != -- ]]; do sbatch_opts+=("$1"); shift; done
    shift
fi

simmim=$(sbatch --parsable --job-name=swinv2-simmim "${sbatch_opts[@]}" \
    scripts/slurm/pretrain.sbatch +stage=simmim "$@")
simmim=${simmim%%;*}  # --parsable prints "id;cluster" on federated clusters
supervised=$(sbatch --parsable --job-name=swinv2-supervised --dependency=afterok:"$simmim" \
    --kill-on-invalid-dep=yes "${sbatch_opts[@]}" scripts/slurm/pretrain.sbatch +stage=supervised "$@")
echo "simmim ${simmim} supervised ${supervised%%;*}"
