#!/usr/bin/env bash
# Installs SLURM and munge from the distribution (Debian/Ubuntu, as root) for the localhost cluster that
# tests/slurm/ starts. Does nothing when both are there already.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq slurm-wlm munge >/dev/null
