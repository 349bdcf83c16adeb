#!/usr/bin/env bash
# Benchmark authproxy on this machine: a local nginx upstream, authproxy under
# gunicorn, load from wrk and curl, all on 127.0.0.1. See bench/README.md.
#
#   bench/run.sh                 configurations (a)-(d), three rounds, about 7 minutes
#   bench/run.sh --with-peers    the same, then the peers' harness with the
#                                peers and authproxy as candidates, and ratios
#   bench/run.sh --sweep         forwarder only under several gunicorn settings
#   bench/run.sh --only forwarder,noidentity
#   bench/run.sh --no-install    use what is installed; never call apt or pip
#
# Configurations: forwarder (a), pipeline (b: access log + identity verifying
# a token + bearer injection), refusing (c: the same, requests without a token
# get 401), noidentity (d: the full pipeline minus identity); and, when asked
# for with --only, baseline (b with the authproxy installed in BASELINE_VENV,
# e.g. an earlier commit, measured in the same rounds) and gevent (b under
# worker_class = "gevent").
# Knobs (environment): ROUNDS (3: every configuration that many times, in
# turn; the tables show medians), PEER_RUNS (1: runs of the peers' harness,
# medians of their ratios), DURATION (10s), SMALL_CONNS (32), M1_CONNS (8),
# WRK_THREADS (2), WARMUP (2s), BIG_REPEAT (1), WORKERS (2), THREADS (8),
# WORKER_CLASS (authproxy's default), BASELINE_VENV, KEEPALIVE (75), LOG_LEVEL (info), VENV, BENCH_VAR
# (/var/tmp/authproxy-bench), UPSTREAM_ADDR (127.0.0.1:18090), PROXY_ADDR
# (127.0.0.1:18091), WAIT_IDLE (0), PEERS_HARNESS, PEERS, PEERS_VENV, SWEEP,
# SWEEP_KINDS.
# Raw results: bench/results/<timestamp>/ (summary.md is the printed table).
set -uo pipefail
export PATH=$PATH:/usr/sbin:/sbin
export LC_ALL=C

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$REPO/bench
LIB=$BENCH/lib
. "$LIB/config.sh"

ROUNDS=${ROUNDS:-3}
PEER_RUNS=${PEER_RUNS:-1}
DURATION=${DURATION:-10s}
SMALL_DURATION=${SMALL_DURATION:-$DURATION}
M1_DURATION=${M1_DURATION:-$DURATION}
SMALL_CONNS=${SMALL_CONNS:-32}
M1_CONNS=${M1_CONNS:-8}
WRK_THREADS=${WRK_THREADS:-2}
WARMUP=${WARMUP:-2s}
BIG_REPEAT=${BIG_REPEAT:-1}
BIG_MAX_TIME=${BIG_MAX_TIME:-300}
RSS_INTERVAL=${RSS_INTERVAL:-0.2}
READY_TIMEOUT=${READY_TIMEOUT:-30}
WAIT_IDLE=${WAIT_IDLE:-0}      # seconds to wait for the machine to be at most IDLE_PCT % busy
IDLE_PCT=${IDLE_PCT:-10}       #   before each configuration (also passed to the peers' harness)
WORKERS=${WORKERS:-2}
THREADS=${THREADS:-8}
WORKER_CLASS=${WORKER_CLASS:-}  # empty: the installed authproxy's default
KEEPALIVE=${KEEPALIVE:-75}
LOG_LEVEL=${LOG_LEVEL:-info}
BENCH_VAR=${BENCH_VAR:-/var/tmp/authproxy-bench}
UPSTREAM_ADDR=${UPSTREAM_ADDR:-127.0.0.1:18090}
PROXY_ADDR=${PROXY_ADDR:-127.0.0.1:18091}
PEERS_HARNESS=${PEERS_HARNESS:-$REPO/../shared/bench/run.sh}
PEERS=${PEERS:-nginx_proxy go_httputil werkzeug_proxy wsgiproxy2 urllib3_lean naive_requests gunicorn_hello}
SWEEP=${SWEEP:-1x8 2x8 2x16 4x4 gevent:2x16}
SWEEP_KINDS=${SWEEP_KINDS:-forwarder}
TEAM_DOMAIN=bench.cloudflareaccess.com
AUDIENCE=bench-aud
BIG_SIZE=$((256 << 20))
export DASHBOARD_TOKEN=${DASHBOARD_TOKEN:-benchtoken}

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "bench: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*"; }

with_peers=0 sweep=0 install=1 only=""
while [ $# -gt 0 ]; do
    case $1 in
        --with-peers) with_peers=1 ;;
        --sweep) sweep=1 ;;
        --only) [ $# -ge 2 ] || die "--only needs a list"; only=$2; shift ;;
        --only=*) only=${1#*=} ;;
        --no-install) install=0 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
CONFIGS=${only//,/ }
CONFIGS=${CONFIGS:-forwarder pipeline noidentity refusing}
for c in $CONFIGS; do
    case $c in forwarder|pipeline|refusing|noidentity|gevent) ;;
        baseline) [ -x "${BASELINE_VENV:-}/bin/authproxy" ] || die "baseline needs BASELINE_VENV" ;;
        *) die "unknown configuration: $c" ;;
    esac
done
for n in "$ROUNDS" "$PEER_RUNS"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "ROUNDS and PEER_RUNS take a whole number from 1, got $n"
done
for a in "$UPSTREAM_ADDR" "$PROXY_ADDR"; do
    case $a in 127.*:*) ;; *) die "only loopback addresses (127.x.x.x:port), got $a" ;; esac
done

# ---------------------------------------------------------------- installation

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo > /dev/null; then sudo "$@"
    else die "need root or sudo to run: $*"; fi
}

install_system_packages() {
    local need=()
    command -v wrk > /dev/null || need+=(wrk)
    command -v curl > /dev/null || need+=(curl)
    command -v ss > /dev/null || need+=(iproute2)
    command -v python3 > /dev/null || need+=(python3)
    if [ -z "${VENV:-}" ] && ! python3 -c 'import ensurepip, venv' 2> /dev/null; then
        need+=(python3-venv)
    fi
    command -v nginx > /dev/null || need+=(nginx)
    [ ${#need[@]} -gt 0 ] || return 0
    [ "$install" = 1 ] || die "missing: ${need[*]} (and --no-install was given)"
    command -v apt-get > /dev/null || die "missing ${need[*]}; install them (no apt-get here)"
    as_root apt-get update -qq || die "apt-get update failed"
    local i
    for i in "${!need[@]}"; do
        # the small build where it exists (Debian 12, Ubuntu 22.04); plain nginx elsewhere
        if [ "${need[$i]}" = nginx ] && apt-cache show nginx-light > /dev/null 2>&1; then
            need[$i]=nginx-light
        fi
    done
    log "installing ${need[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" || die "apt-get install failed"
}

prepare_venv() {
    if [ -n "${VENV:-}" ]; then
        [ -x "$VENV/bin/python" ] || die "VENV=$VENV has no bin/python"
        VENV=$(cd "$VENV" && pwd)  # the peers' harness runs candidates from its own folder
        if ! "$VENV/bin/python" -c 'import authproxy' 2> /dev/null; then
            [ "$install" = 1 ] || die "authproxy is not installed in $VENV"
            "$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO" || die "pip failed"
        fi
    else
        VENV=$BENCH/.venv
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
            die "python3 is $(python3 -V 2>&1); authproxy needs 3.11 or newer (or set VENV)"
        if [ "$install" = 1 ]; then
            [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || die "cannot create $VENV"
            log "installing authproxy from $REPO into $VENV"
            "$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO" || die "pip failed"
        fi
        [ -x "$VENV/bin/authproxy" ] || die "no authproxy in $VENV"
    fi
    PY=$VENV/bin/python
}

# ---------------------------------------------------------------- processes

alive() {  # pid exists and is not a zombie
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2> /dev/null | cut -d' ' -f1)
    [ -n "$state" ] && [ "$state" != Z ]
}
group_members() {  # pids whose process group is $1
    local f
    for f in /proc/[0-9]*/stat; do
        [ "$(sed 's/.*) //' "$f" 2> /dev/null | cut -d' ' -f3)" = "$1" ] && { f=${f#/proc/}; echo "${f%/stat}"; }
    done
}
port_busy() { ss -Hltn "sport = :${1##*:}" 2> /dev/null | grep -q .; }
http_code() { curl -s -o /dev/null --max-time "${2:-5}" -w '%{http_code}' "${@:3}" "$1"; }

proxy_pid="" watch_pid="" upstream_started=0
MY_PGID=$(sed 's/.*) //' /proc/$$/stat | cut -d' ' -f3)

start_proxy() {  # name config-file
    local name=$1 conf=$2 t0=$SECONDS
    if port_busy "$PROXY_ADDR"; then
        echo "$PROXY_ADDR is in use; not starting $name" > "$OUT/logs/$name.log"
        return 1
    fi
    set -m  # own process group, so that all of it can be found and stopped
    "${RUN_VENV:-$VENV}/bin/authproxy" serve --config "$conf" > "$OUT/logs/$name.log" 2>&1 < /dev/null &
    proxy_pid=$!
    set +m
    while (( SECONDS - t0 < READY_TIMEOUT )); do
        alive "$proxy_pid" || { echo "[exited during start-up]" >> "$OUT/logs/$name.log"; return 1; }
        [ "$(http_code "http://$PROXY_ADDR/healthz" 2)" = 200 ] && return 0
        sleep 0.2
    done
    echo "[no answer on /healthz within ${READY_TIMEOUT}s]" >> "$OUT/logs/$name.log"
    return 1
}

stop_proxy() {
    [ -n "$proxy_pid" ] || return 0
    local pid=$proxy_pid p
    proxy_pid=""
    kill -TERM "$pid" 2> /dev/null
    for _ in $(seq 1 75); do alive "$pid" || break; sleep 0.2; done
    for p in $(group_members "$pid"); do kill -KILL "$p" 2> /dev/null; done
    wait "$pid" 2> /dev/null
    for _ in $(seq 1 50); do port_busy "$PROXY_ADDR" || break; sleep 0.1; done
}

watch_start() {  # out.json
    rm -f "$1"
    "$PY" "$LIB/procwatch.py" "$1" "${proxy_pid:-0}" "$(upstream_pid)" "$MY_PGID" "$RSS_INTERVAL" &
    watch_pid=$!
    for _ in $(seq 1 100); do [ -s "$1" ] && break; sleep 0.05; done
}
watch_stop() {
    [ -n "$watch_pid" ] || return 0
    kill -TERM "$watch_pid" 2> /dev/null
    wait "$watch_pid" 2> /dev/null
    watch_pid=""
}

cleanup() {
    [ -n "$watch_pid" ] && kill -TERM "$watch_pid" 2> /dev/null
    stop_proxy
    [ "$upstream_started" = 1 ] && stop_upstream
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- upstream

NGX=$BENCH_VAR/nginx
WWW=$BENCH_VAR/www
upstream_pid() { [ -s "$NGX/nginx.pid" ] && cat "$NGX/nginx.pid" || echo 0; }

make_data() {
    mkdir -p "$NGX" "$WWW" || die "cannot create $BENCH_VAR"
    chmod 755 "$BENCH_VAR" "$WWW"
    local name size
    for name_size in "1m:$((1 << 20))" "big:$BIG_SIZE"; do
        name=${name_size%%:*} size=${name_size#*:}
        if [ "$(stat -c %s "$WWW/$name" 2> /dev/null)" != "$size" ]; then
            log "creating $WWW/$name ($size bytes, once)"
            head -c "$size" /dev/urandom > "$WWW/$name.tmp" && mv "$WWW/$name.tmp" "$WWW/$name"
        fi
        chmod 644 "$WWW/$name"
    done
    M1_SHA=$(sha256sum "$WWW/1m" | cut -d' ' -f1)
}

start_upstream() {
    local old
    old=$(upstream_pid)
    if [ "$old" != 0 ] && alive "$old" && grep -q nginx "/proc/$old/cmdline" 2> /dev/null; then
        log "stopping the upstream a previous run left behind (pid $old)"
        stop_upstream
    fi
    port_busy "$UPSTREAM_ADDR" && die "$UPSTREAM_ADDR is in use (set UPSTREAM_ADDR)"
    local body t
    body=$(printf '%099d' 0 | tr 0 x)   # + "\n" = 100 bytes
    for t in client_body proxy fastcgi uwsgi scgi; do mkdir -p "$NGX/$t"; done
    cat > "$NGX/nginx.conf" << EOF
# written by bench/run.sh
worker_processes 2;
pid $NGX/nginx.pid;
error_log $NGX/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    default_type application/octet-stream;
    client_body_temp_path $NGX/client_body;
    proxy_temp_path $NGX/proxy;
    fastcgi_temp_path $NGX/fastcgi;
    uwsgi_temp_path $NGX/uwsgi;
    scgi_temp_path $NGX/scgi;
    server {
        listen $UPSTREAM_ADDR backlog=4096;
        root $WWW;
        location = /small { default_type text/plain; return 200 "$body\n"; }
        location = /1m { }
        location = /big { }
        location = /certs { default_type application/json; alias $WWW/certs.json; }
        location = /auth { default_type text/plain; return 200 "\$http_authorization\n"; }
        location = /nginx_status { stub_status; }
        location / { return 404; }
    }
}
EOF
    local flags=(-p "$NGX/" -c "$NGX/nginx.conf")
    # -e (nginx >= 1.19.5) keeps start-up errors away from /var/log/nginx.
    nginx -h 2>&1 | grep -q -- ' -e ' && flags+=(-e "$NGX/error.log")
    nginx "${flags[@]}" || die "nginx did not start (see $NGX/error.log)"
    upstream_started=1
    for _ in $(seq 1 50); do
        if [ "$(http_code "http://$UPSTREAM_ADDR/small" 2)" = 200 ]; then
            cat "$WWW/big" "$WWW/1m" > /dev/null   # into the page cache
            [ "$(curl -s "http://$UPSTREAM_ADDR/small" | wc -c)" = 100 ] || die "upstream /small is not 100 bytes"
            return 0
        fi
        sleep 0.1
    done
    die "the upstream did not answer on $UPSTREAM_ADDR (see $NGX/error.log)"
}

stop_upstream() {
    local pid
    pid=$(upstream_pid)
    upstream_started=0
    [ "$pid" != 0 ] || return 0
    kill -TERM "$pid" 2> /dev/null
    for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
    rm -f "$NGX/nginx.pid"
}

# ---------------------------------------------------------------- scenarios

workers_now=$WORKERS

conn_split() {  # established client connections per proxy process, busiest first: "20/12"
    ss -Htnp state established "sport = :${PROXY_ADDR##*:}" 2> /dev/null | grep -o 'pid=[0-9]*' |
        sort | uniq -c | sort -rn | awk '{ printf "%s%s", sep, $1; sep = "/" } END { print "" }'
}

measure_wrk() {  # name scenario path conns duration [expected status]
    local name=$1 scen=$2 path=$3 conns=$4 dur=$5 expect=${6:-}
    local raw=$OUT/raw/$name.r$ROUND.$scen split
    local f=$raw.wrk.txt w=$raw.watch.json
    watch_start "$w"
    { sleep 1.5; conn_split > "$raw.conns"; } &
    local splitter=$!
    wrk -t"$WRK_THREADS" -c"$conns" -d"$dur" --timeout 10s --latency -s "$LIB/summary.lua" \
        "${HDR[@]}" "http://$PROXY_ADDR$path" > "$f" 2>&1
    wait "$splitter"
    watch_stop
    split=$(cat "$raw.conns" 2> /dev/null)
    "$PY" "$LIB/results.py" wrk "$ROWS" "$name" "$scen" "$f" "$w" --connections "$conns" \
        ${split:+--conns "$split"} --processes "$workers_now" ${expect:+--expect-status "$expect"}
}

measure_big() {  # name
    local name=$1 f=$OUT/raw/$1.r$ROUND.big.curl.txt w=$OUT/raw/$1.r$ROUND.big.watch.json
    : > "$f"
    watch_start "$w"
    for ((i = 1; i <= BIG_REPEAT; i++)); do
        curl -sS -o /dev/null --max-time "$BIG_MAX_TIME" "${HDR[@]}" \
            -w '%{http_code} %{size_download} %{time_total} %{time_starttransfer}\n' \
            "http://$PROXY_ADDR/big" >> "$f" 2>> "$OUT/raw/$name.r$ROUND.big.curl.err"
    done
    watch_stop
    "$PY" "$LIB/results.py" curl "$ROWS" "$name" big "$f" "$w" --size "$BIG_SIZE"
}

check() {  # name kind: is this the configuration we think it is?
    local name=$1 kind=$2 notes=() errors=0 got
    expect() {  # what got wanted
        if [ "$2" = "$3" ]; then notes+=("$1=ok"); else notes+=("$1=${2:0:40}(want ${3:0:40})"); errors=$((errors + 1)); fi
    }
    if [ "$kind" = refusing ]; then
        expect small_without_token "$(http_code "http://$PROXY_ADDR/small" 10)" 401
    else
        expect small "$(http_code "http://$PROXY_ADDR/small" 10 "${HDR[@]}")" 200
        got=$(curl -s --max-time 30 "${HDR[@]}" "http://$PROXY_ADDR/1m" | sha256sum | cut -d' ' -f1)
        expect 1m_sha256 "$got" "$M1_SHA"
    fi
    case $kind in
        pipeline|noidentity)
            expect authorization "$(curl -s --max-time 10 "${HDR[@]}" "http://$PROXY_ADDR/auth")" \
                "Bearer $DASHBOARD_TOKEN" ;;
    esac
    [ "$kind" = pipeline ] && expect expired_token \
        "$(http_code "http://$PROXY_ADDR/small" 10 -H "Cf-Access-Jwt-Assertion: $(cat "$OUT/identity/expired-token")")" 403
    "$PY" "$LIB/results.py" check "$ROWS" "$name" "$errors" "${notes[*]}"
}

inspect_log() {  # name log-name: secrets in the proxy's log? then keep only its ends
    local f=$OUT/logs/$2.log lines leaks=0
    [ -f "$f" ] || return 0
    grep -qF "$DASHBOARD_TOKEN" "$f" && leaks=$((leaks + 1))
    grep -qF "$TOKEN" "$f" && leaks=$((leaks + 1))
    if [ "$leaks" -gt 0 ]; then
        "$PY" "$LIB/results.py" check "$ROWS" "$1" "$leaks" "LEAK: a credential is in $f"
    fi
    lines=$(wc -l < "$f")
    if [ "$lines" -gt 60 ]; then
        { head -n 40 "$f"; echo "[... $((lines - 60)) lines left out ...]"; tail -n 20 "$f"; } > "$f.short"
        mv "$f.short" "$f"
    fi
    echo "$2: $lines log lines" >> "$OUT/meta.txt"
}

busy() {  # % of all cores busy over one second
    local a b
    a=$(head -1 /proc/stat); sleep 1; b=$(head -1 /proc/stat)
    echo "$a $b" | awk '{ for (i = 2; i <= 11; i++) { ta += $i; tb += $(i + 11) }
        printf "%.0f", 100 * (1 - (($16 + $17) - ($5 + $6)) / (tb - ta)) }'
}
wait_idle() {  # before a configuration: up to WAIT_IDLE seconds for a quiet machine
    (( WAIT_IDLE > 0 )) || return 0
    local t0=$SECONDS pct
    while pct=$(busy); (( pct > IDLE_PCT )); do
        if (( SECONDS - t0 >= WAIT_IDLE )); then
            log "the machine is still ${pct}% busy after ${WAIT_IDLE}s; measuring anyway"
            return 0
        fi
        log "the machine is ${pct}% busy (other processes); waiting"
        sleep 4
    done
}

run_config() {  # name kind scenario...
    local name=$1 kind=$2 conf=$OUT/configs/$1.toml logname=$1.r$ROUND
    shift 2
    wait_idle
    log "== $name$( (( ROUNDS > 1 )) && echo " (round $ROUND of $ROUNDS)")"
    HDR=(-H "Cf-Access-Jwt-Assertion: $TOKEN")
    [ "$kind" = refusing ] && HDR=()
    write_config "$conf" "$kind" "$PROXY_ADDR" "http://$UPSTREAM_ADDR"
    if ! start_proxy "$logname" "$conf"; then
        "$PY" "$LIB/results.py" check "$ROWS" "$name" 1 \
            "failed to start: $(tail -c 400 "$OUT/logs/$logname.log" | tr '\n|' '  ')"
        stop_proxy
        return
    fi
    check "$name" "$kind"
    wrk -t"$WRK_THREADS" -c"$SMALL_CONNS" -d"$WARMUP" "${HDR[@]}" "http://$PROXY_ADDR/small" \
        > "$OUT/raw/$name.r$ROUND.warmup.txt" 2>&1
    local scen
    for scen in "$@"; do
        sleep 1
        case $scen in
            small) measure_wrk "$name" small /small "$SMALL_CONNS" "$SMALL_DURATION" \
                       "$([ "$kind" = refusing ] && echo 401)" ;;
            1m) measure_wrk "$name" 1m /1m "$M1_CONNS" "$M1_DURATION" ;;
            big) measure_big "$name" ;;
        esac
    done
    alive "$proxy_pid" || "$PY" "$LIB/results.py" check "$ROWS" "$name" 1 "the proxy died during the run"
    stop_proxy
    inspect_log "$name" "$logname"
    sleep 1
}

identity_available() {
    "$VENV/bin/authproxy" plugins 2> /dev/null | grep -E '^identity ' | grep -vq 'failed to import'
}

# ---------------------------------------------------------------- phases

run_configs() {
    local c order=$CONFIGS
    # Identity on and off run next to each other, and swap places every other
    # round: a machine that slows down over time then favours neither.
    if (( ROUND % 2 == 0 )); then
        order=$(echo "$CONFIGS" | sed 's/\bpipeline\b/@/; s/\bnoidentity\b/pipeline/; s/@/noidentity/')
    fi
    for c in $order; do
        if [[ $c == pipeline || $c == refusing ]] && [ "$HAVE_IDENTITY" = 0 ]; then
            log "== $c: skipped: the identity step is not installed ('authproxy plugins' shows no importable 'identity')"
            echo "$c: skipped, no identity step" >> "$OUT/meta.txt"
            continue
        fi
        case $c in
            refusing) run_config refusing refusing small ;;
            baseline) RUN_VENV=$BASELINE_VENV run_config baseline pipeline small 1m big ;;
            gevent) AP_WORKER_CLASS=gevent run_config gevent pipeline small 1m big ;;
            *) run_config "$c" "$c" small 1m big ;;
        esac
    done
}

run_sweep() {
    local spec class w t kind
    for kind in $SWEEP_KINDS; do
        for spec in $SWEEP; do
            class=authproxy
            if [[ $spec == *:* ]]; then class=${spec%%:*}; spec=${spec#*:}; fi
            w=${spec%x*} t=${spec#*x}
            [[ $w =~ ^[0-9]+$ && $t =~ ^[0-9]+$ ]] || die "SWEEP: expected [CLASS:]WORKERSxTHREADS, got $spec"
            if [ "$class" = gevent ] && ! "$PY" -c 'import gunicorn.workers.ggevent' 2> /dev/null; then
                # gunicorn's gevent worker also imports packaging.
                if [ "$install" = 0 ] || ! "$VENV/bin/pip" install -q --disable-pip-version-check \
                        gevent packaging || ! "$PY" -c 'import gunicorn.workers.ggevent'; then
                    log "== $kind@$class:${w}x$t: skipped (gevent does not install here)"
                    continue
                fi
            fi
            workers_now=$w
            AP_WORKERS=$w AP_THREADS=$t AP_WORKER_CLASS=$class \
                run_config "$kind@$class:${w}x$t" "$kind" small 1m big
        done
    done
    workers_now=$WORKERS
}

run_peers() {
    if [ ! -x "$PEERS_HARNESS" ]; then
        log "peers: no harness at $PEERS_HARNESS (set PEERS_HARNESS); skipping the peers"
        return 1
    fi
    local here cands
    here=$LIB/harness_candidate.sh
    # shellcheck disable=SC2206
    cands=($PEERS
        "custom:authproxy_forwarder:exec '$here' forwarder"
        "custom:authproxy_pipeline_noid:exec '$here' noidentity")
    if [ "$HAVE_IDENTITY" = 1 ]; then
        cands+=("custom:authproxy_pipeline:exec '$here' selftoken")
    else
        log "peers: no identity step installed: authproxy_pipeline (identity on) is left out"
    fi
    local run tsv
    for ((run = 1; run <= PEER_RUNS; run++)); do
        mkdir -p "$OUT/peers/run$run"
        log "peers (run $run of $PEER_RUNS): $PEERS_HARNESS ${cands[*]}"
        (
            unset VENV
            [ -n "${PEERS_VENV:-}" ] && export VENV=$PEERS_VENV
            export AP_VENV=$VENV_AP AP_CONF_DIR=$OUT/configs AP_CERTS_URL AP_TOKEN_FILE="$OUT/identity/token"
            export RESULTS_DIR=$OUT/peers/run$run GUNICORN_WORKERS=$WORKERS GUNICORN_THREADS=$THREADS
            export SMALL_DURATION M1_DURATION SMALL_CONNS M1_CONNS WRK_THREADS WARMUP BIG_REPEAT
            export WAIT_IDLE IDLE_PCT
            "$PEERS_HARNESS" "${cands[@]}"
        ) 2>&1 | tee -a "$OUT/peers.log"
        tsv=$(ls -t "$OUT/peers/run$run"/*.tsv 2> /dev/null | head -1)
        if [ -n "$tsv" ]; then PEERS_TSVS+=("$tsv"); else log "peers: run $run wrote no results"; fi
    done
    [ ${#PEERS_TSVS[@]} -gt 0 ] || { log "peers: the harness wrote no results"; return 1; }
}

# ---------------------------------------------------------------- main

install_system_packages
prepare_venv
VENV_AP=$VENV
export AP_WORKERS=$WORKERS AP_THREADS=$THREADS AP_WORKER_CLASS=$WORKER_CLASS AP_KEEPALIVE=$KEEPALIVE
export AP_LOG_LEVEL=$LOG_LEVEL AP_TEAM_DOMAIN=$TEAM_DOMAIN AP_AUDIENCE=$AUDIENCE
export AP_CERTS_URL=http://$UPSTREAM_ADDR/certs

OUT=$BENCH/results/$(date +%Y%m%d-%H%M%S)
ROWS=$OUT/rows.jsonl
mkdir -p "$OUT/logs" "$OUT/configs" "$OUT/raw" "$OUT/identity" || die "cannot create $OUT"
: > "$ROWS"

make_data
"$PY" "$LIB/identity_keys.py" "$OUT/identity" "$TEAM_DOMAIN" "$AUDIENCE" || die "cannot make the identity keys"
cp "$OUT/identity/certs.json" "$WWW/certs.json" && chmod 644 "$WWW/certs.json" ||
    die "cannot write $WWW/certs.json"
TOKEN=$(cat "$OUT/identity/token")
start_upstream
HAVE_IDENTITY=0
identity_available && HAVE_IDENTITY=1

{
    echo "date: $(date -Is)"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(awk '/MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r)"
    echo "busy before the run: $(busy)% of all cores"
    echo "authproxy: $("$VENV/bin/authproxy" --version 2>&1) at $(git -C "$REPO" describe --always --dirty 2> /dev/null)"
    echo "python: $("$PY" -V 2>&1); $("$VENV/bin/pip" freeze 2> /dev/null | grep -iE '^(gunicorn|requests|urllib3|werkzeug|pyjwt|gevent)=' | tr '\n' ' ')"
    echo "nginx: $(nginx -v 2>&1 | cut -d/ -f2); wrk: $(wrk -v 2>&1 | head -1 | cut -d' ' -f2)"
    echo "settings: gunicorn $([ "$sweep" = 1 ] && echo "as named in each row (SWEEP=$SWEEP)" || echo "$WORKER_CLASS ${WORKERS}x$THREADS") keepalive=$KEEPALIVE; small ${SMALL_CONNS}c/$SMALL_DURATION, 1m ${M1_CONNS}c/$M1_DURATION, wrk -t$WRK_THREADS, warm-up $WARMUP, big x$BIG_REPEAT; $ROUNDS round(s), $PEER_RUNS run(s) of the peers' harness"
    echo "identity step: $([ "$HAVE_IDENTITY" = 1 ] && echo installed || echo 'not installed: (b) and (c) skipped')"
} > "$OUT/meta.txt"
log "results -> $OUT"
sed 's/^/  /' "$OUT/meta.txt"

for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
    export BENCH_ROUND=$ROUND
    if [ "$sweep" = 1 ]; then run_sweep; else run_configs; fi
done
PEERS_TSVS=()
[ "$with_peers" = 1 ] && run_peers

{
    echo "## authproxy benchmark, $(date -I)"
    echo
    grep -E '^(machine|authproxy|settings|identity step):' "$OUT/meta.txt" | sed 's/^/    /'
    echo
    "$PY" "$LIB/results.py" report "$ROWS" ${PEERS_TSVS[@]:+--peers "${PEERS_TSVS[@]}"}
} > "$OUT/summary.md"
echo
cat "$OUT/summary.md"
echo
log "raw results: $OUT"
