"""Fuzz the config loader: TOML text -> :func:`authproxy.config.from_mapping` -> the
forwarder and the option checks of the built-in steps.

A config error must be a :class:`~authproxy.errors.ConfigError` naming the key;
anything else (a ``ValueError`` from deep inside, a ``TypeError``) is a crash.
Nothing here touches the network: the identity step's options are resolved
(:func:`authproxy.middleware.identity.providers.resolve`) but no key set is fetched, and templates
reading files are left out.

    python -m fuzz.run config      # or: python -m fuzz.fuzz_config [libFuzzer flags] CORPUS
"""

from __future__ import annotations

import tomllib
from typing import Any

from authproxy import plugins
from authproxy.config import from_mapping
from authproxy.errors import ConfigError
from authproxy.middleware.access_log import AccessLog
from authproxy.middleware.identity import Identity
from authproxy.middleware.identity.providers import resolve
from authproxy.middleware.inject import InjectHeaders
from authproxy.upstream.forwarder import Forwarder

#: Options of the identity step that :func:`resolve` checks.
_RESOLVED = ("team_domain", "audience", "certs_url", "issuer", "header", "cookie", "algorithms")


def _app(environ: Any, start_response: Any) -> list[bytes]:
    return []


def check(data: bytes) -> None:
    """One input: raises only if the loader fails in a way it should not."""
    try:
        text = data.decode("utf-8")
        document = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return  # load_file turns these into a ConfigError naming the file
    try:
        config = from_mapping(document, source="fuzz")
        up = config.upstream
        Forwarder(
            up.url,
            tls_verify=up.tls_verify,
            connect_timeout=up.connect_timeout,
            read_timeout=up.read_timeout,
            preserve_host=up.preserve_host,
        ).close()
        for step in config.pipeline:
            options = dict(step.options)
            if step.use == "identity":
                # What instantiate() does before building the step (which would fetch keys).
                plugins.check(Identity, options, step.where)
                provider = options.pop("provider", "cloudflare-access")
                resolve(provider, **{k: options[k] for k in _RESOLVED if k in options})
            elif step.use == "inject-headers":
                if "file:" in repr(options):
                    continue  # would read whatever file the input names
                plugins.instantiate(InjectHeaders, _app, options, step.where)
            elif step.use == "access-log":
                plugins.instantiate(AccessLog, _app, options, step.where)
    except ConfigError:
        pass
