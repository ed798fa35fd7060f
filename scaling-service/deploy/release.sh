#!/bin/bash
# The scaling service's release phase (`whist-release` in the image; heroku.yml `release`,
# Procfile `release:`). Heroku runs it in a one-off dyno of the new image before any dyno of the
# new release starts, and keeps the old release running when it fails. It also runs on every
# config var change and on a rollback (then with the older release's migrations and metadata:
# whist-migrate only warns about newer migrations it does not carry).
#
#   1. whist-migrate: the schema's pending migrations, in one transaction, under a lock;
#   2. Hasura's metadata (replace_metadata, then reload_metadata), unless
#      WHIST_SKIP_HASURA_METADATA=true.
#
# Config vars it reads:
#   DATABASE_URL          PostgreSQL URL of a role allowed to change the schema (sslmode=require)
#   DATABASE_CA_PEM       optional: PEM text of the CA that signed the database's certificate
#                         (written to a file for PGSSLROOTCERT; a config var cannot hold a file)
#   HASURA_GRAPHQL_URL    the service's own setting; the metadata API is beside it (/v1/metadata)
#   HASURA_METADATA_URL   optional override of that
#   HASURA_ADMIN_SECRET   the service's own setting
# Exit status: 0 when the schema and the metadata are current; anything else aborts the release.

set -euo pipefail

WHIST_MIGRATE=${WHIST_MIGRATE:-whist-migrate}
METADATA_FILE=${HASURA_METADATA_FILE:-/etc/whist/hasura-metadata.json}
# Hasura answers metadata calls in well under a second; a slow answer is a problem to surface.
CURL_TIMEOUT_S=30

log() { echo "whist-release: $*"; }
die() {
  echo "whist-release: error: $*" >&2
  exit 1
}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

migrate() {
  : "${DATABASE_URL:?DATABASE_URL must be set for the release phase}"
  if [[ -n ${DATABASE_CA_PEM:-} ]]; then
    printf '%s\n' "$DATABASE_CA_PEM" >"$scratch/database-ca.pem"
    export PGSSLROOTCERT=$scratch/database-ca.pem
  fi
  log "applying migrations"
  "$WHIST_MIGRATE" || die "whist-migrate failed: the release is not deployed"
}

# metadata_call BODY_FILE: POSTs to Hasura's metadata API; the secret travels in a header file,
# never on a command line.
metadata_call() {
  curl -fsS --max-time "$CURL_TIMEOUT_S" --retry 3 --retry-connrefused \
    -H @"$scratch/headers" --data-binary @"$1" "$METADATA_URL"
  echo
}

apply_metadata() {
  if [[ ${WHIST_SKIP_HASURA_METADATA:-false} == true ]]; then
    log "WHIST_SKIP_HASURA_METADATA=true: Hasura metadata left alone"
    return 0
  fi
  : "${HASURA_ADMIN_SECRET:?HASURA_ADMIN_SECRET must be set}"
  if [[ -n ${HASURA_METADATA_URL:-} ]]; then
    METADATA_URL=$HASURA_METADATA_URL
  else
    : "${HASURA_GRAPHQL_URL:?HASURA_GRAPHQL_URL must be set}"
    [[ $HASURA_GRAPHQL_URL == */v1/graphql ]] ||
      die "HASURA_GRAPHQL_URL does not end in /v1/graphql: set HASURA_METADATA_URL"
    METADATA_URL=${HASURA_GRAPHQL_URL%/v1/graphql}/v1/metadata
  fi
  [[ -f $METADATA_FILE ]] || die "no metadata file at $METADATA_FILE"
  (
    umask 077
    printf 'x-hasura-admin-secret: %s\ncontent-type: application/json\n' \
      "$HASURA_ADMIN_SECRET" >"$scratch/headers"
  )
  {
    printf '{"type":"replace_metadata","args":'
    cat "$METADATA_FILE"
    printf '}'
  } >"$scratch/replace.json"
  printf '%s' '{"type":"reload_metadata","args":{"reload_sources":true}}' >"$scratch/reload.json"
  log "applying Hasura metadata at $METADATA_URL"
  metadata_call "$scratch/replace.json" || die "replace_metadata failed"
  metadata_call "$scratch/reload.json" || die "reload_metadata failed"
}

migrate
apply_metadata
log "done"
