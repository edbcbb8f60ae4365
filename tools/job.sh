#!/usr/bin/env bash
# `make job`: the cluster path on one machine, with the commands of docs/cluster.md's "On a Ray cluster" section
# (tests/test_ray_job.py checks that docs/cluster.md shows exactly the lines below the marker, and runs them). It
# starts a Ray head (token auth on, ports of its own, this project's environment), submits a short training run
# with the real `ray job submit --working-dir .`, streams its logs to the end, reports SUCCEEDED or FAILED with
# the run's output folder, and stops the head it started, and only that one.
#   JOB_ARGS  Hydra overrides for the job (default: 2 steps of the embedded default)
#   JOB_OUT   the run's output folder (default: outputs/job)
set -euo pipefail
cd "$(dirname "$0")/.."
# --- docs/cluster.md's commands ---
export PATH="$PWD/.venv/bin:$PATH"          # a job runs with the head's `python`: start the head from the venv
export RAY_AUTH_MODE=token                  # token auth on the head and on every client ...
ray get-auth-token --generate > /dev/null   # ... with the token in ~/.ray/auth_token (created if missing)
OUT="$(realpath -m "${JOB_OUT:-outputs/job}")"  # absolute: the job runs in a copy of this folder
mkdir -p "$OUT"
setsid ray start --head --block --num-cpus=8 --port=6390 --dashboard-port=8275 --ray-client-server-port=6391 \
    --dashboard-agent-listen-port=52375 --disable-usage-stats > "$OUT/ray_head.log" 2>&1 &
HEAD=$!
stop_head() { pkill -s $HEAD; sleep 5; pkill -KILL -s $HEAD; wait $HEAD 2> /dev/null; }
trap 'stop_head || true' EXIT               # the processes of this head's session only (`ray stop` stops all Rays)
for _ in $(seq 60); do                      # wait for the dashboard; give up at once if the head died
  ray job list --address http://127.0.0.1:8275 > /dev/null 2>&1 && break
  kill -0 $HEAD 2> /dev/null || { cat "$OUT/ray_head.log"; exit 1; }
  sleep 2
done
if ray job submit --address http://127.0.0.1:8275 --working-dir . -- python -m orchestration.train \
    cluster.address=auto trainer.output_dir="$OUT" model.tiny_dir="$PWD/outputs/models/tiny" \
    model.warm_start_dir="$PWD/outputs/models/warm_start" ${JOB_ARGS:-trainer.total_steps=2}; then
  echo "job SUCCEEDED: metrics, checkpoints and wandb run in $OUT"
else
  echo "job FAILED: its logs are above; the head's log is $OUT/ray_head.log"; exit 1
fi
