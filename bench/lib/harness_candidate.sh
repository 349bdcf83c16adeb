#!/usr/bin/env bash
# authproxy as a candidate of the peers' harness (bench/run.sh --with-peers):
#
#   harness_candidate.sh KIND      (KIND as in lib/config.sh)
#
# The harness runs it with LISTEN_ADDRESS, DASHBOARD_PROXY_URL and
# DASHBOARD_TOKEN set; bench/run.sh exports AP_VENV, AP_CONF_DIR and the
# AP_* settings. It writes the configuration, then becomes the server (exec),
# so the pid the harness holds is gunicorn's master.
set -euo pipefail
. "$(dirname "$0")/config.sh"
kind=$1
conf=$AP_CONF_DIR/harness-$kind.toml
write_config "$conf" "$kind" "$LISTEN_ADDRESS" "$DASHBOARD_PROXY_URL"
exec "$AP_VENV/bin/authproxy" serve --config "$conf"
