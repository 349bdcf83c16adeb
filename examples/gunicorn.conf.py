"""gunicorn settings for authproxy behind cloudflared, for running gunicorn yourself::

    AUTHPROXY_CONFIG=/etc/authproxy/authproxy.toml \\
        gunicorn -c gunicorn.conf.py 'authproxy.wsgi:application'

``authproxy serve`` needs no such file: it applies the same values from the
config's ``[server]`` section (listen, workers, threads, worker_class, timeout,
graceful_timeout, keepalive, forwarded_allow_ips, log_level). Use this file when
you need a gunicorn setting that ``[server]`` does not have (``header_map``,
request limits, ``max_requests``). Any value here can be overridden at run time
with ``GUNICORN_CMD_ARGS``, e.g. ``GUNICORN_CMD_ARGS="--bind=127.0.0.1:9000"``.

docs/deploy.md explains each choice.
"""

from __future__ import annotations

import os

from authproxy.serve.logs import logconfig_dict

# cloudflared in the same pod reaches us on localhost; the kubelet probes the pod IP.
bind = [os.environ.get("AUTHPROXY_LISTEN", "0.0.0.0:8000")]

# authproxy's worker: an event loop holds idle keep-alive connections, slow
# clients, streamed responses (watch, log follow, SSE) and WebSockets, a socket
# each; `threads` is the number of requests being answered at once. It reads
# a request head within 10 s and lets a body stall 60 s (authproxy serve takes
# both from [server] header_timeout and body_timeout). Plain "gthread" works
# too, with a thread held for every stream and tunnel.
worker_class = "authproxy.serve.worker.Worker"
workers = 2
threads = 16

# This is the worker heartbeat, not a request time limit: a
# long response does not trip it. The upstream's own limits are
# [upstream] connect_timeout and read_timeout in authproxy.toml.
timeout = 30

# SIGTERM: stop accepting, let in-flight requests finish for this long, then
# kill. Keep it below the pod's terminationGracePeriodSeconds minus the preStop
# sleep.
graceful_timeout = 25

# cloudflared keeps idle origin connections for 90 s (originRequest
# keepAliveTimeout). Keep ours longer, so gunicorn never closes a connection at
# the moment cloudflared reuses it (which surfaces as a sporadic 502).
keepalive = 100

# Whose X-Forwarded-Proto/-For gunicorn believes: cloudflared over loopback.
# Never "*" while the port is reachable from other pods.
forwarded_allow_ips = "127.0.0.1,::1"
# And nothing else from it: gunicorn would take SCRIPT_NAME/PATH_INFO from such
# a peer's request headers (authproxy decides on the raw target regardless).
forwarder_headers = ""

# Header names with underscores ("X_Auth_User") map to the same environ key
# as their dashed twins ("X-Auth-User"), so a client could smuggle one past a
# proxy that strips the other. gunicorn's default "drop" silently discards
# them; "refuse" answers 400 instead. Never "dangerous" in front of authproxy.
header_map = "drop"

# A Cloudflare Access cookie (CF_Authorization) plus the app's own cookies can
# approach gunicorn's 8190-byte limit per header line; raise it if clients get
# 400 "Request Header Fields Too Large".
limit_request_field_size = 16384

# The heartbeat file: memory-backed, so a slow or read-only disk cannot stall
# workers (the root file system is read-only in the example pod).
worker_tmp_dir = "/dev/shm"

# authproxy's access-log step writes the access log; gunicorn's own would
# repeat every request without redaction. gunicorn writes its access lines
# whenever logconfig_dict is set, so its access logger is silenced too, and
# authproxy's logger class skips gathering those lines in the first place.
accesslog = None
logger_class = "authproxy.serve.gunicorn.GunicornLogger"
errorlog = "-"
loglevel = "info"
logconfig_dict = logconfig_dict("info")
logconfig_dict["loggers"]["gunicorn.access"] = {
    "level": "WARNING",
    "handlers": [],
    "propagate": False,
}
proc_name = "authproxy"
