from __future__ import annotations

from django.http import HttpRequest, JsonResponse


def whoami(request: HttpRequest) -> JsonResponse:
    """Who is calling, as the identity middleware verified it.

    Django's ``request.META`` is the WSGI environ, so the identity is there.
    """
    identity = request.META["authproxy.identity"]
    return JsonResponse(
        {"email": identity.email, "service_token": identity.service_token, "name": identity.name}
    )
