#!/usr/bin/env bash
# Cloud TPU v4 pod training: provision, install, launch, watch, clean up.
#
#   ./setup_tpu_training.sh setup      bucket + TPU (queued resources) + deps + code + launch
#   ./setup_tpu_training.sh resume     deps + code + launch on an existing TPU (skips creation)
#   ./setup_tpu_training.sh status     TPU state and whether training runs on each worker
#   ./setup_tpu_training.sh monitor    follow worker 0's log
#   ./setup_tpu_training.sh logs [N]   print worker N's log (default 0)
#   ./setup_tpu_training.sh ssh [N]    shell on worker N (default 0)
#   ./setup_tpu_training.sh stop       stop training on all workers
#   ./setup_tpu_training.sh cleanup    delete the TPU (the bucket and its checkpoints stay)
#   ./setup_tpu_training.sh config     only write the training config (CONFIG_FILE)
#
# Edit the variables below (or export them before running).
set -euo pipefail

export PROJECT_ID="${PROJECT_ID:-your-gcp-project}"
export TPU_NAME="${TPU_NAME:-tinyllama-v4-32}"
export ZONE="${ZONE:-us-central2-b}"
export ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
export RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
export WANDB_API_KEY="${WANDB_API_KEY:-}"             # copied to the workers in a 0600 file, never on a command line
export BUCKET="${BUCKET:-gs://${PROJECT_ID}-sdce}"
export TORCH_VERSION="${TORCH_VERSION:-2.9.0}"        # torch and torch_xla must match; the XLA lane tests 2.9.0
export NUM_HOSTS="${NUM_HOSTS:-4}"                    # v4-32: 4 hosts
export TENSORCORES_PER_HOST="${TENSORCORES_PER_HOST:-8}"  # --tpu_cores as in the README: a v4 host's 4 chips x 2
export TENSORCORES_PER_DEVICE="${TENSORCORES_PER_DEVICE:-2}" # v4 (megacore): one XLA device is a chip's 2 TensorCores
export GLOBAL_BATCH="${GLOBAL_BATCH:-1024}"           # sequences per optimizer step, over the whole slice
export PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-4}"
export CONFIG_FILE="${CONFIG_FILE:-config_tinyllama_tpuv4.yaml}"
# SlimPajama-627B, streamed (data.streaming): nothing is downloaded or tokenised ahead, memory does not grow with it.
export DATASET="${DATASET:-cerebras/SlimPajama-627B}"
export SEQ_LEN="${SEQ_LEN:-2048}"

QR_NAME="${TPU_NAME}-qr"
REMOTE_DIR="sdce"
MOUNT="/mnt/sdce"    # the bucket, mounted with gcsfuse on every worker: a shared output_dir
REPO_ROOT="$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)"

tpu_ssh() {  # tpu_ssh WORKER COMMAND
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT_ID" --worker="$1" --command="$2"
}

write_config() {
  local path="$CONFIG_FILE" devices=$((TENSORCORES_PER_HOST / TENSORCORES_PER_DEVICE * NUM_HOSTS))
  local accumulation=$((GLOBAL_BATCH / (PER_DEVICE_BATCH * devices)))
  # One pass over SlimPajama's ~627B tokens at GLOBAL_BATCH x SEQ_LEN tokens a step (a stream has no length).
  local steps=${MAX_STEPS:-$((627000000000 / (GLOBAL_BATCH * SEQ_LEN)))}
  if ((PER_DEVICE_BATCH * devices * accumulation != GLOBAL_BATCH)); then
    echo "GLOBAL_BATCH=${GLOBAL_BATCH} is not a multiple of PER_DEVICE_BATCH=${PER_DEVICE_BATCH} x ${devices} devices" >&2
    return 1
  fi
  [[ "$path" = /* ]] || path="$REPO_ROOT/$path"
  cat >"$path" <<YAML
model:
  name_or_path: TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
  dtype: float32
  gradient_checkpointing: true
surrogate:
  name_or_path: Qwen/Qwen2.5-1.5B
  dtype: bfloat16
  k: 30
  probability_threshold: 0.02
  loss_weight_initial: 1.0
  loss_weight_final: 0.0
data:
  dataset_name: ${DATASET}
  streaming: true
  max_seq_length: ${SEQ_LEN}
  num_workers: 2
training:
  device: tpu
  tpu_cores: ${TENSORCORES_PER_HOST}       # ${NUM_HOSTS} hosts x $((TENSORCORES_PER_HOST / TENSORCORES_PER_DEVICE)) devices = ${devices} data-parallel ranks
  tpu_num_hosts: ${NUM_HOSTS}
  max_steps: ${steps}                     # ${GLOBAL_BATCH} x ${SEQ_LEN} tokens a step: one pass over 627B tokens
  per_device_train_batch_size: ${PER_DEVICE_BATCH}          # x ${devices} devices x ${accumulation} accumulation = ${GLOBAL_BATCH} sequences per step
  gradient_accumulation_steps: ${accumulation}
  learning_rate: 3e-4
  warmup_steps: 500
  weight_decay: 0.1
  mixed_precision: bf16
  loss_type: surrogate
  output_dir: ${MOUNT}/${TPU_NAME}
  save_steps: 500
  save_total_limit: 3
  wandb_project: sdce-training
YAML
  echo "wrote $path"
}

create_bucket() {
  gcloud storage buckets describe "$BUCKET" --project="$PROJECT_ID" >/dev/null 2>&1 \
    || gcloud storage buckets create "$BUCKET" --project="$PROJECT_ID" --location="${ZONE%-*}"
}

create_tpu() {
  gcloud compute tpus queued-resources create "$QR_NAME" --node-id="$TPU_NAME" --zone="$ZONE" \
    --project="$PROJECT_ID" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION"
  echo "waiting for $QR_NAME to become ACTIVE (this can take a while)..."
  until [ "$(gcloud compute tpus queued-resources describe "$QR_NAME" --zone="$ZONE" --project="$PROJECT_ID" \
              --format='value(state.state)')" = "ACTIVE" ]; do
    sleep 30
  done
}

install_deps() {
  tpu_ssh all "set -e
    pip install -q torch==${TORCH_VERSION} 'torch_xla[tpu]==${TORCH_VERSION}' \
      -f https://storage.googleapis.com/libtpu-releases/index.html
    sudo apt-get -qq update && sudo apt-get -qq install -y gcsfuse || true
    sudo mkdir -p ${MOUNT} && sudo chown \$USER ${MOUNT}
    mountpoint -q ${MOUNT} || gcsfuse --implicit-dirs ${BUCKET#gs://} ${MOUNT}"
}

copy_code() {
  local archive
  archive="$(mktemp -d)/sdce.tar.gz"
  tar -C "$REPO_ROOT" -czf "$archive" --exclude=.venv --exclude=.cache --exclude=outputs --exclude=.git .
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:~/sdce.tar.gz" --zone="$ZONE" --project="$PROJECT_ID" --worker=all
  tpu_ssh all "mkdir -p ~/${REMOTE_DIR} && tar -C ~/${REMOTE_DIR} -xzf ~/sdce.tar.gz && pip install -q -e ~/${REMOTE_DIR}[wandb,tpu]"
}

copy_secrets() {  # the W&B key as a 0600 file on every worker: a command line is visible to every local user (ps)
  [ -n "$WANDB_API_KEY" ] || { echo "WANDB_API_KEY is not set: W&B will log offline on the workers"; return 0; }
  local dir
  dir="$(mktemp -d)"
  (umask 077 && printf 'export WANDB_API_KEY=%q\n' "$WANDB_API_KEY" >"$dir/sdce_secrets")
  gcloud compute tpus tpu-vm scp "$dir/sdce_secrets" "$TPU_NAME:~/.sdce_secrets" --zone="$ZONE" --project="$PROJECT_ID" --worker=all
  rm -rf "$dir"
  tpu_ssh all "chmod 600 ~/.sdce_secrets"
}

launch() {
  for ((i = 0; i < NUM_HOSTS; i++)); do
    tpu_ssh "$i" "cd ~/${REMOTE_DIR} && { [ -f ~/.sdce_secrets ] && . ~/.sdce_secrets || export WANDB_MODE=offline; } \
      && export PJRT_DEVICE=TPU TPU_PROCESS_COUNT=${NUM_HOSTS} TPU_PROCESS_ID=$i \
      && nohup python train.py --config ${CONFIG_FILE} --resume_from_checkpoint latest > ~/train.log 2>&1 &" &
  done
  wait
  echo "training launched on ${NUM_HOSTS} hosts; follow it with: $0 monitor"
}

case "${1:-}" in
  setup) write_config; create_bucket; create_tpu; install_deps; copy_code; copy_secrets; launch ;;
  resume) write_config; install_deps; copy_code; copy_secrets; launch ;;
  status)
    gcloud compute tpus queued-resources describe "$QR_NAME" --zone="$ZONE" --project="$PROJECT_ID" --format='value(state.state)'
    tpu_ssh all "pgrep -f 'train.py' >/dev/null && echo \"\$(hostname): training\" || echo \"\$(hostname): idle\"" ;;
  monitor) tpu_ssh 0 "tail -f ~/train.log" ;;
  logs) tpu_ssh "${2:-0}" "cat ~/train.log" ;;
  ssh) gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT_ID" --worker="${2:-0}" ;;
  stop) tpu_ssh all "pkill -f 'train.py' || true" ;;
  config) write_config ;;
  cleanup) gcloud compute tpus queued-resources delete "$QR_NAME" --zone="$ZONE" --project="$PROJECT_ID" --force --quiet ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
