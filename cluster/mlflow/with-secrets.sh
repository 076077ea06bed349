#!/bin/sh
# Entrypoint of the MLflow container: turns the compose secrets (files) into the variables MLflow
# and libpq read, then runs the given command. The values never appear in docker-compose.yaml, in
# `docker inspect` or on a command line.
set -eu
SECRETS_DIR="${SECRETS_DIR:-/run/secrets}"   # overridable only so tests can run this script

read_secret() {
    if [ ! -s "$SECRETS_DIR/$1" ]; then
        echo "with-secrets.sh: secret $1 is missing or empty: create secrets/$1 (README.md)" >&2
        exit 1
    fi
    cat "$SECRETS_DIR/$1"
}

PGPASSWORD="$(read_secret postgres_password)"
MLFLOW_AUTH_ADMIN_PASSWORD="$(read_secret mlflow_admin_password)"
# Signs the basic-auth app's CSRF tokens; must be the same in every server worker.
MLFLOW_FLASK_SERVER_SECRET_KEY="$(read_secret mlflow_flask_secret_key)"
export PGPASSWORD MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
exec "$@"
