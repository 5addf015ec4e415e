#!/usr/bin/env bash
# First boot of the postgres container (/docker-entrypoint-initdb.d, as the superuser):
# the database and the roles the stack connects as. sql/ grants them their privileges when
# `python -m consumer migrate` runs as the owner; the group roles exist beforehand, so the
# owner needs no CREATEROLE (sql/007 and sql/009 only grant to roles that exist).
#
#   fleet_owner       LOGIN, owns database fleet (and so schema public): runs migrate
#   fleet_writer      NOLOGIN group: what the consumer may do (sql/009)
#   fleet_reader      NOLOGIN group: what a read-only API may do (sql/009)
#   fleet_api         NOLOGIN group: the API that also assigns meters (sql/007)
#   fleet_sessions    NOLOGIN group: the sessions worker (sql/012)
#   fleet_consumer    LOGIN IN ROLE fleet_writer: the consumer service
#   fleet_api_reader  LOGIN IN ROLE fleet_reader: the api service
#   fleet_sessions_worker  LOGIN IN ROLE fleet_sessions: the sessions service
#
# Passwords come from the environment (FLEET_OWNER_PASSWORD, FLEET_CONSUMER_PASSWORD,
# FLEET_API_READER_PASSWORD, FLEET_SESSIONS_PASSWORD); nothing here is a secret. Safe to run again: existing roles
# get the current password, nothing is created twice.
set -euo pipefail

: "${FLEET_OWNER_PASSWORD:?FLEET_OWNER_PASSWORD must be set}"
: "${FLEET_CONSUMER_PASSWORD:?FLEET_CONSUMER_PASSWORD must be set}"
: "${FLEET_API_READER_PASSWORD:?FLEET_API_READER_PASSWORD must be set}"
: "${FLEET_SESSIONS_PASSWORD:?FLEET_SESSIONS_PASSWORD must be set}"

psql --no-psqlrc --no-password -v ON_ERROR_STOP=1 \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    --set owner_password="$FLEET_OWNER_PASSWORD" \
    --set consumer_password="$FLEET_CONSUMER_PASSWORD" \
    --set api_reader_password="$FLEET_API_READER_PASSWORD" \
    --set sessions_password="$FLEET_SESSIONS_PASSWORD" <<'SQL'
-- Group roles: privileges only, nobody logs in as them.
SELECT format('CREATE ROLE %I NOLOGIN', r)
  FROM unnest(ARRAY['fleet_writer', 'fleet_reader', 'fleet_api', 'fleet_sessions']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) \gexec

-- Logins: created once, their password (re)set from the environment on every run.
SELECT format('CREATE ROLE %I LOGIN', r)
  FROM unnest(ARRAY['fleet_owner', 'fleet_consumer', 'fleet_api_reader', 'fleet_sessions_worker']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) \gexec
ALTER ROLE fleet_owner NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'owner_password';
ALTER ROLE fleet_consumer NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'consumer_password';
ALTER ROLE fleet_api_reader NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'api_reader_password';
ALTER ROLE fleet_sessions_worker NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'sessions_password';
GRANT fleet_writer TO fleet_consumer;
GRANT fleet_reader TO fleet_api_reader;
GRANT fleet_sessions TO fleet_sessions_worker;

SELECT 'CREATE DATABASE fleet OWNER fleet_owner'
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'fleet') \gexec
ALTER DATABASE fleet OWNER TO fleet_owner;
-- Only the stack's roles connect (the owner may, as owner).
REVOKE ALL ON DATABASE fleet FROM PUBLIC;
GRANT CONNECT ON DATABASE fleet TO fleet_writer, fleet_reader, fleet_api, fleet_sessions;
SQL
