#!/usr/bin/env bash
# A Ray head with token authentication and an MLflow server on this machine, both bound to
# 127.0.0.1, so `t5adapt submit` can be tried exactly as against a real cluster. Stop them with
# cluster/local/down.sh. Run it with the project's environment active (`ray` and `mlflow` on PATH).
#
# Settings (environment):
#   T5ADAPT_CLUSTER_DIR     state: pids, logs, the MLflow store, the run root (default ~/.t5adapt/local-cluster)
#   T5ADAPT_DASHBOARD_PORT  Ray dashboard and Jobs API (default 8265)
#   T5ADAPT_MLFLOW_PORT     MLflow server (default 5000)
#   T5ADAPT_MLFLOW_ARTIFACTS where the server keeps artifacts: a directory or s3://BUCKET/PREFIX, which
#                           the server reaches with boto3's usual settings (default $STATE/mlartifacts)
#   T5ADAPT_RAY_PORT        Ray's GCS (default 6379); T5ADAPT_NUM_CPUS: CPUs the head offers (default: all)
#   T5ADAPT_RAY_PORTS_BASE  if set, every other Ray port is taken from BASE, BASE+1, ... (to run beside
#                           another Ray on this machine)
#   RAY_AUTH_TOKEN_PATH     the token file (default ~/.ray/auth_token); a new token is made if it is missing
set -euo pipefail

STATE=${T5ADAPT_CLUSTER_DIR:-$HOME/.t5adapt/local-cluster}
DASHBOARD_PORT=${T5ADAPT_DASHBOARD_PORT:-8265}
MLFLOW_PORT=${T5ADAPT_MLFLOW_PORT:-5000}
RAY_PORT=${T5ADAPT_RAY_PORT:-6379}
NUM_CPUS=${T5ADAPT_NUM_CPUS:-$(nproc)}
TOKEN_FILE=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}

for tool in ray mlflow python setsid; do
  command -v "$tool" >/dev/null || { echo "up.sh: '$tool' is not on PATH: activate the project's environment (make; . .venv/bin/activate)" >&2; exit 2; }
done
mkdir -p "$STATE"
for name in ray mlflow; do
  if [ -f "$STATE/$name.pid" ] && kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then
    echo "up.sh: already running ($STATE/$name.pid); stop it first: cluster/local/down.sh" >&2; exit 2
  fi
done

# The token: made once, readable by this user only, never printed.
if [ ! -s "$TOKEN_FILE" ]; then
  mkdir -p "$(dirname "$TOKEN_FILE")"
  (umask 077; python -c 'import secrets; print(secrets.token_hex(32))' > "$TOKEN_FILE")
fi

wait_http() {  # URL NAME LOG: until the URL answers (any HTTP status), or fail with the log's tail
  if ! python - "$1" <<'PY'
import sys, time, urllib.error, urllib.request
for _ in range(120):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=5)
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)  # it answers (401 without a token is an answer)
    except OSError:
        time.sleep(1)
sys.exit(1)
PY
  then
    echo "up.sh: $2 did not come up on $1; the end of $3:" >&2; tail -20 "$3" >&2; exit 1
  fi
}

export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
setsid mlflow server --backend-store-uri "sqlite:///$STATE/mlflow.db" --artifacts-destination "${T5ADAPT_MLFLOW_ARTIFACTS:-$STATE/mlartifacts}" \
  --host 127.0.0.1 --port "$MLFLOW_PORT" >"$STATE/mlflow.log" 2>&1 < /dev/null &
echo $! > "$STATE/mlflow.pid"

extra_ports=()
if [ -n "${T5ADAPT_RAY_PORTS_BASE:-}" ]; then
  b=$T5ADAPT_RAY_PORTS_BASE
  extra_ports=(--ray-client-server-port $b --node-manager-port $((b+1)) --object-manager-port $((b+2))
               --dashboard-agent-listen-port $((b+3)) --dashboard-agent-grpc-port $((b+4)) --metrics-export-port $((b+5))
               --runtime-env-agent-port $((b+6)) --min-worker-port $((b+10)) --max-worker-port $((b+200)))
fi
# Jobs run by this head inherit its environment: token mode, the MLflow server, the run root.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" T5ADAPT_ROOT="${T5ADAPT_ROOT:-$STATE/runs}"
setsid ray start --head --block --node-ip-address 127.0.0.1 --port "$RAY_PORT" --dashboard-host 127.0.0.1 \
  --dashboard-port "$DASHBOARD_PORT" --num-cpus "$NUM_CPUS" --temp-dir "$STATE/ray" "${extra_ports[@]}" \
  >"$STATE/ray.log" 2>&1 < /dev/null &
echo $! > "$STATE/ray.pid"

wait_http "http://127.0.0.1:$MLFLOW_PORT/health" "the MLflow server" "$STATE/mlflow.log"
wait_http "http://127.0.0.1:$DASHBOARD_PORT/api/version" "the Ray dashboard" "$STATE/ray.log"

echo "Ray head (token auth on, dashboard http://127.0.0.1:$DASHBOARD_PORT) and MLflow (http://127.0.0.1:$MLFLOW_PORT) are up."
echo "Runs go to $T5ADAPT_ROOT; logs: $STATE/ray.log, $STATE/mlflow.log. Stop both: cluster/local/down.sh"
echo "Point t5adapt at them:"
echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
if [ "$TOKEN_FILE" != "$HOME/.ray/auth_token" ]; then
  echo "# and, as the token is not in ~/.ray/auth_token:"
  echo "export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
fi
