"""ASGI entry point: the web server of `make run`, so pages can stream and consoles connect."""

import os

from channels.routing import ProtocolTypeRouter
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "vmportal.settings")
django_application = get_asgi_application()

from provisioning.routing import websocket_application  # noqa: E402 - needs Django set up

application = ProtocolTypeRouter({"http": django_application, "websocket": websocket_application()})
