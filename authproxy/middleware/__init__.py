"""The built-in pipeline steps, each a WSGI middleware usable on its own."""

from __future__ import annotations

from .access_log import AccessLog
from .cross_origin import CrossOrigin
from .health import Health
from .inject import InjectHeaders
from .request_id import RequestId

__all__ = ["AccessLog", "CrossOrigin", "Health", "InjectHeaders", "RequestId"]
