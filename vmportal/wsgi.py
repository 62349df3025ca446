"""WSGI entry point (the ASGI one serves streaming pages; this is for plain WSGI servers)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "vmportal.settings")
application = get_wsgi_application()
