"""WebSocket routes of the portal, behind the Origin check and Django's session authentication."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.urls import path

from provisioning import consumers
from provisioning.services.consoles import BAD_ORIGIN

websocket_urlpatterns = [
    path("ws/guests/<uuid:uuid>/console/serial", consumers.SerialConsumer.as_asgi()),
    path("ws/guests/<uuid:uuid>/console/graphics", consumers.DisplayConsumer.as_asgi()),
]


class SameSiteOriginValidator(OriginValidator):
    """Channels' Origin check against ALLOWED_HOSTS, plus: the page's origin is this site's.

    The Origin must name the host the socket was opened on (as Django's CSRF check wants of
    a form), or one of CSRF_TRUSTED_ORIGINS. A refused socket is accepted and closed with
    BAD_ORIGIN and a reason, so the page can say why.
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin", b"").decode("latin1")
        host = headers.get(b"host", b"").decode("latin1")
        parsed = urlsplit(origin) if origin else None
        same_site = parsed is not None and (
            parsed.netloc == host or origin in settings.CSRF_TRUSTED_ORIGINS
        )
        if same_site and self.valid_origin(parsed):
            return await self.application(scope, receive, send)
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
            await send(
                {
                    "type": "websocket.close",
                    "code": BAD_ORIGIN,
                    "reason": f"origin not allowed: {origin or 'none'}"[:120],
                }
            )
        return None


def websocket_application() -> Any:
    """The ASGI application of the portal's WebSockets."""
    return SameSiteOriginValidator(
        AuthMiddlewareStack(URLRouter(websocket_urlpatterns)), settings.ALLOWED_HOSTS
    )
