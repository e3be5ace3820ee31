#!/usr/bin/env bash
# Submit a sae-jax job to SLURM on multi-node GPUs: one process per node, all of its GPUs.
#
#   launch/slurm.sh --nodes 4 --gpus-per-node 8 --partition gpu --time 12:00:00 -- \
#       train --config=configs/bank.py --config.train.store=/shared/stores/smollm \
#       --config.train.run_dir=/shared/runs/bank1 --config.train.mesh_model=8
#   add --dry-run: the batch script and the sbatch command are printed, nothing is submitted
#
# The batch script (written to --logs DIR/NAME.sbatch, output in DIR/NAME-<jobid>.out) runs
#   srun --kill-on-bad-exit=1 VENV/bin/sae-jax JOB ARGS --config.distributed.auto=True
# from this checkout: JAX reads the coordinator, process count and index from SLURM's
# environment. --kill-on-bad-exit ends every process when one fails (and JAX's heartbeat ends
# the rest if a node dies). The store and the run directory must be on a filesystem every node
# mounts (checkpoints are written by all processes together); .venv must exist here
# (`make install`, with jax[cuda12] on GPU nodes).
set -euo pipefail

nodes=1 gpus=8 cpus=16 partition="" account="" time="24:00:00" name="sae-jax" dry=0 job=()
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="$repo/.venv" logs="$repo/runs/slurm"
usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while (($#)); do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --cpus-per-node) cpus="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --account) account="$2"; shift 2 ;;
    --time) time="$2"; shift 2 ;;
    --job-name) name="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; job=("$@"); break ;;
    *) echo "launch/slurm.sh: unknown option $1" >&2; usage ;;
  esac
done
[[ ${#job[@]} -gt 0 && "${job[0]}" == "sae-jax" ]] && job=("${job[@]:1}")
[[ ${#job[@]} -gt 0 ]] || { echo "launch/slurm.sh: no job after -- (e.g. -- train --config.train.store=S ...)" >&2; exit 2; }
for v in nodes gpus cpus; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "launch/slurm.sh: --${v/gpus/gpus-per-node} must be a positive integer, got ${!v}" >&2; exit 2; }
done

qa() { if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi; }
q() { local out="" a; for a in "$@"; do out+="$(qa "$a") "; done; echo "${out% }"; }

script="#!/bin/bash
#SBATCH --job-name=$name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --cpus-per-task=$cpus
#SBATCH --time=$time
#SBATCH --output=$logs/%x-%j.out"
[[ -n "$partition" ]] && script+=$'\n'"#SBATCH --partition=$partition"
[[ -n "$account" ]] && script+=$'\n'"#SBATCH --account=$account"
script+="
set -euo pipefail
cd $(qa "$repo")
export PYTHONUNBUFFERED=1
srun --kill-on-bad-exit=1 $(q "$venv/bin/sae-jax" "${job[@]}") --config.distributed.auto=True"

file="$logs/$name.sbatch"
if ((dry)); then
  echo "$script"
  echo "+ $(q sbatch "$file")"
  exit 0
fi
[[ -x "$venv/bin/sae-jax" ]] || { echo "launch/slurm.sh: $venv/bin/sae-jax not found (make install, or --venv PATH)" >&2; exit 1; }
mkdir -p "$logs"
printf '%s\n' "$script" > "$file"
sbatch "$file"
