# Writing authproxy configurations for the benchmark. Sourced by bench/run.sh
# and bench/lib/harness_candidate.sh.
#
#   write_config FILE KIND LISTEN UPSTREAM_URL
#
# KIND:
#   forwarder    no [[pipeline]] steps (the built-in health and request-id
#                steps and the forwarder only)
#   pipeline     access-log (json) + identity (cloudflare-access) + inject-headers
#   refusing     the same file as pipeline (the load just carries no token)
#   noidentity   access-log + inject-headers: the full pipeline minus identity
#   selftoken    pipeline with one more inject-headers step in front that sets
#                the Access assertion itself, for load generators that cannot
#                send headers (the peers' harness)
#
# Settings from the environment: AP_WORKERS, AP_THREADS, AP_WORKER_CLASS,
# AP_KEEPALIVE, AP_REUSE_PORT (true), AP_LOG_LEVEL, AP_CERTS_URL, AP_TEAM_DOMAIN, AP_AUDIENCE,
# AP_TOKEN_FILE (selftoken only). The injected credential comes from
# $DASHBOARD_TOKEN at start-up (the same variable as the Go program's).

write_config() {
    local file=$1 kind=$2 listen=$3 upstream=$4
    case $kind in
        forwarder|pipeline|refusing|noidentity|selftoken) ;;
        *) echo "write_config: unknown kind $kind" >&2; return 2 ;;
    esac
    {
        echo "# written by bench/run.sh: $kind"
        echo "[server]"
        echo "listen = \"$listen\""
        echo "workers = ${AP_WORKERS:-2}"
        echo "threads = ${AP_THREADS:-8}"
        [ -n "${AP_WORKER_CLASS:-}" ] && echo "worker_class = \"$AP_WORKER_CLASS\""
        echo "keepalive = ${AP_KEEPALIVE:-75}"
        echo "reuse_port = ${AP_REUSE_PORT:-true}"
        echo "graceful_timeout = 5"
        echo "log_level = \"${AP_LOG_LEVEL:-info}\""
        echo
        echo "[upstream]"
        echo "url = \"$upstream\""
        [ "$kind" = forwarder ] && return 0
        echo
        echo "[[pipeline]]"
        echo "use = \"access-log\""
        echo "format = \"json\""
        if [ "$kind" = selftoken ]; then
            echo
            echo "[[pipeline]]"
            echo "use = \"inject-headers\""
            echo "set = { Cf-Access-Jwt-Assertion = \"$(tr -d '\n' < "$AP_TOKEN_FILE")\" }"
        fi
        if [ "$kind" != noidentity ]; then
            echo
            echo "[[pipeline]]"
            echo "use = \"identity\""
            echo "provider = \"cloudflare-access\""
            echo "team_domain = \"${AP_TEAM_DOMAIN:-bench.cloudflareaccess.com}\""
            echo "audience = [\"${AP_AUDIENCE:-bench-aud}\"]"
            echo "certs_url = \"$AP_CERTS_URL\""
        fi
        echo
        echo "[[pipeline]]"
        echo "use = \"inject-headers\""
        echo "set = { Authorization = \"Bearer \${env:DASHBOARD_TOKEN}\" }"
    } > "$file"
}
