"""The ``authproxy`` command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from . import __version__, plugins
from .config import Config, listen_from_go, load_config
from .errors import ConfigError

_SECRET_KEY = re.compile(r"token|secret|password|passwd|key|credential|auth", re.I)


def _redact_options(options: Any, key: str = "") -> Any:
    if isinstance(options, dict):
        return {k: _redact_options(v, k) for k, v in options.items()}
    if isinstance(options, list):
        return [_redact_options(v, key) for v in options]
    if isinstance(options, str) and ("${" in options or _SECRET_KEY.search(key)):
        return "***"
    return options


def describe(config: Config, pipeline: Any) -> str:
    """The resolved stack, secrets redacted, as ``check-config`` prints it."""
    s, up = config.server, config.upstream
    if up.url.lower().startswith("http://"):
        tls = "plain HTTP, no TLS"
    elif up.tls_verify is True:
        tls = "TLS verified"
    elif up.tls_verify is False:
        tls = "TLS NOT VERIFIED (tls_verify = false)"
    else:
        tls = f"TLS verified against {up.tls_verify}"
    lines = [
        f"config:   {config.source}",
        f"listen:   {s.listen} ({s.workers} workers x {s.threads} threads, {s.worker_class})",
        f"upstream: {up.url} ({tls}; timeouts connect {up.connect_timeout}s,"
        f" read {up.read_timeout}s; host {'preserved' if up.preserve_host else 'rewritten'})",
        f"health:   live {config.health.live}, ready {config.health.ready}",
        "pipeline, outermost first:",
        f"  - request-id ({config.request_id.header})",
    ]
    for (name, step), spec in zip(pipeline.steps, pipeline.specs, strict=True):
        if hasattr(step, "describe"):
            shown = step.describe()
        else:
            shown = _redact_options(dict(spec.options))
        lines.append(f"  - {name} {json.dumps(shown, sort_keys=True)}")
    lines.append(f"  - forwarder -> {up.url}")
    return "\n".join(lines)


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    if getattr(args, "listen", None):
        config = config.replace(
            server=config.server.__class__(
                **{**config.server.__dict__, "listen": listen_from_go(args.listen)}
            )
        )
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    from .pipeline import build_app
    from .serve.gunicorn import serve
    from .serve.logs import configure

    configure()
    config = _load(args)
    # Build once before serving so that every error shows up now, not in a worker.
    build_app(config).close()
    serve(config)
    return 0


def config_warnings(config: Config, pipeline: Any) -> list[str]:
    """What would make the configured proxy refuse every request, though the config is valid.

    A step that can be unready says so through ``check_ready()`` (the identity
    step while it holds no signing keys); ``/readyz`` asks the same.
    """
    found = []
    for (_name, step), spec in zip(pipeline.steps, pipeline.specs, strict=True):
        check_ready = getattr(step, "check_ready", None)
        if not callable(check_ready) or check_ready():
            continue
        certs_url = getattr(step, "certs_url", None)
        if certs_url:
            why = f"no signing keys could be fetched from {certs_url}: every request is refused"
        else:
            why = "not ready: every request may be refused and /readyz answers 503"
        found.append(f"WARNING: {spec.where}: {why}")
    return found


def cmd_check_config(args: argparse.Namespace) -> int:
    from .pipeline import build_app

    config = _load(args)
    pipeline = build_app(config)
    try:
        found = config_warnings(config, pipeline)
        for line in found:
            print(line, file=sys.stderr)
        sys.stderr.flush()  # the warnings before the stack, on a terminal too
        print(describe(config, pipeline))
    finally:
        pipeline.close()
    if not found:
        print("ok")
        return 0
    if args.strict:
        print(f"failed: {len(found)} warning(s) above, and --strict makes them errors")
        return 1
    print(f"ok, with {len(found)} warning(s) above (--strict fails on them)")
    return 0


_RST_ROLE = re.compile(r":\w+:`~?([^`]+)`")


def _plain(text: str) -> str:
    """Docstring text without reST markup, for the terminal."""
    return _RST_ROLE.sub(r"\1", text).replace("``", "")


def _describe_plugin(plugin: plugins.Plugin, clash: list[plugins.Plugin]) -> list[str]:
    lines = [f"{plugin.name}  ({plugin.distribution}, {plugin.entry_point.value})"]
    for other in clash:
        lines.append(
            f"  ! the name is also claimed by {other.distribution}: a config that uses it"
            " fails until one is uninstalled"
        )
    try:
        factory = plugin.load()
        declared, open_ended = plugins.options(factory)
    except Exception as exc:
        return [*lines, f"  ! failed to load: {exc!r}"]
    lines.append(f"  {_plain(plugins.summary(factory)) or '(no description)'}")
    if not declared and not open_ended:
        return [*lines, "  no options"]
    rows = [
        (o.name, o.type, "required" if o.required else repr(o.default), _plain(o.doc))
        for o in declared
    ]
    if open_ended:
        rows.append(("...", "", "", "other options are passed through unchecked"))
    header = ("option", "type", "default", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    indent = 2 + sum(widths) + 2 * 3
    width = _wrap_width()
    for row in [header, *rows]:
        cells = "  " + "  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True))
        if not row[3] or width is None:
            lines.append((cells + "  " + row[3]).rstrip())
        elif width - indent >= 40:
            # Wrapped in the column, never cut: the whole text is the reference.
            wrapped = textwrap.wrap(row[3], width - indent)
            lines.append(cells + "  " + wrapped[0])
            lines.extend(" " * indent + more for more in wrapped[1:])
        else:
            lines.append(cells.rstrip())
            lines.extend(
                textwrap.wrap(row[3], width, initial_indent=" " * 6, subsequent_indent=" " * 6)
            )
    return lines


def _wrap_width() -> int | None:
    """The terminal's width; None when the output is no terminal (a pipe, a file):
    then each text is printed whole on its line, for grep."""
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size().columns


def cmd_plugins(args: argparse.Namespace) -> int:
    found = plugins.installed()
    if args.name:
        if args.name not in found:
            print(f"authproxy: no installed step is called {args.name!r}", file=sys.stderr)
            return 1
        found = {args.name: found[args.name]}
    else:
        total = sum(len(c) for c in found.values())
        print(f"{total} pipeline steps installed (entry-point group {plugins.GROUP!r}):")
    for _name, claims in sorted(found.items()):
        for plugin in claims:
            print()
            print("\n".join(_describe_plugin(plugin, [p for p in claims if p is not plugin])))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(listen=args.listen, self_test=args.self_test)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="authproxy", description="An identity-aware reverse proxy (WSGI pipeline)."
    )
    parser.add_argument("--version", action="version", version=f"authproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve with gunicorn (production)")
    serve.add_argument("--config", help="TOML file (default: $AUTHPROXY_CONFIG, ./authproxy.toml)")
    serve.add_argument("--listen", help="HOST:PORT, overrides server.listen")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate and print the stack, secrets redacted")
    check.add_argument("--config", help="TOML file (default: $AUTHPROXY_CONFIG, ./authproxy.toml)")
    check.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 on a warning too (e.g. the identity step could fetch no keys)",
    )
    check.set_defaults(func=cmd_check_config)
    plug = sub.add_parser("plugins", help="list installed pipeline steps and their options")
    plug.add_argument("name", nargs="?", help="show only this step")
    plug.set_defaults(func=cmd_plugins)
    demo = sub.add_parser("demo", help="a local echo upstream behind the proxy, to see it work")
    demo.add_argument("--listen", default="127.0.0.1:8000", help="proxy address (127.0.0.1:8000)")
    demo.add_argument(
        "--self-test", action="store_true", help="send one request through it, print, exit"
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, so that a closed pipe is caught below
        return code
    except BrokenPipeError:
        # The reader left early (`authproxy plugins | head`): stop quietly, as a
        # program killed by SIGPIPE would. stdout goes to /dev/null so that the
        # interpreter's own flush at exit does not fail again (Python's
        # documented recipe, signal module, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except ConfigError as exc:
        print(f"authproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
