#!/usr/bin/env bash
# What `make test` needs besides the virtualenv, installed when it is missing, so that a
# fresh clone on a fresh machine needs nothing but `make test`:
#   prometheus      a real Prometheus server and promtool, for the scrape and dashboard tests
#   docker-compose  Compose's own loader (v1; no engine needed) to validate docker-compose.yml
#   chromium        the browser the console tests drive through Playwright (its own browser
#                   downloads are not used: Debian's build is the one the tests launch)
# PostgreSQL and the Kafka-protocol broker are the fixtures' business: they use the server
# on 127.0.0.1:5432 or start an embedded one, and start their own broker.
set -euo pipefail

missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v docker-compose >/dev/null || missing+=(docker-compose)
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
((${#missing[@]})) || exit 0

echo "make test: installing the Debian packages the tests use: ${missing[*]}"
if [[ $(id -u) -eq 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo=(sudo)
else
    echo "make test: cannot install ${missing[*]} without root; run:" >&2
    echo "  sudo apt-get install --no-install-recommends ${missing[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "make test: no apt-get here; install ${missing[*]} with your package manager" >&2
    exit 1
fi
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
