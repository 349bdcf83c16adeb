"""Logging set-up shared by ``authproxy serve``, the gunicorn entry point and the demo.

Everything goes to stderr through :class:`~authproxy.secrets.RedactingFormatter`:
access lines as bare messages (one JSON object or combined line each), every
other line with time, level and logger name.
"""

from __future__ import annotations

import logging.config
from typing import Any

_FORMATTER = "authproxy.secrets.RedactingFormatter"


def logconfig_dict(level: str = "info") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` dict; gunicorn takes it as ``logconfig_dict``."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {
                "()": _FORMATTER,
                "format": "%(asctime)s %(levelname)s %(name)s: %(message)s",
            },
            "message": {"()": _FORMATTER, "format": "%(message)s"},
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "stream": "ext://sys.stderr",
            },
            "access": {
                "class": "logging.StreamHandler",
                "formatter": "message",
                "stream": "ext://sys.stderr",
            },
        },
        "loggers": {
            "authproxy": {"level": level, "handlers": ["stderr"], "propagate": False},
            "authproxy.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            # The pipeline's access-log step writes the access log; gunicorn's
            # own would repeat it with the query string (tokens) in it.
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
        },
        "root": {"level": "WARNING", "handlers": ["stderr"]},
    }


def configure(level: str = "info") -> None:
    logging.config.dictConfig(logconfig_dict(level))
