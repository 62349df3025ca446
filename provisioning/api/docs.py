"""The API's interactive documentation page, from our own static files."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_safe


@require_safe
def api_docs(request: HttpRequest) -> HttpResponse:
    """Swagger UI over /api/v1/openapi.json (its scripts come from static/vendor, not a CDN)."""
    return render(
        request, "provisioning/api_docs.html", {"schema_url": reverse("api:openapi-json")}
    )
