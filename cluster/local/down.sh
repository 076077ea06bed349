#!/usr/bin/env bash
# Stop what cluster/local/up.sh started (the same T5ADAPT_CLUSTER_DIR): every process of the Ray
# head's session (raylet, GCS, dashboard, workers, job drivers) and of the MLflow server. Other Ray
# clusters on this machine are left alone. Runs, the MLflow store and the token stay.
set -uo pipefail
STATE=${T5ADAPT_CLUSTER_DIR:-$HOME/.t5adapt/local-cluster}

stop_session() {  # NAME: SIGTERM every process of the session whose leader's pid is in NAME.pid
  local pidfile="$STATE/$1.pid"
  [ -f "$pidfile" ] || { echo "down.sh: no $1 to stop ($pidfile missing)"; return 0; }
  local sid; sid=$(cat "$pidfile")
  pkill -TERM -s "$sid" 2>/dev/null
  for _ in $(seq 1 15); do
    pgrep -s "$sid" >/dev/null || break
    sleep 1
  done
  pkill -KILL -s "$sid" 2>/dev/null
  rm -f "$pidfile"
  echo "down.sh: stopped $1"
}
stop_session ray
stop_session mlflow
