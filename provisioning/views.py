"""Views: thin functions that read, call one service, and render."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from . import health
from .models import Guest, ProvisioningRequest

PAGE_SIZE = 50


@require_GET
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    """Every part's health as JSON; 503 when any part is down."""
    body = health.as_json(health.run_all())
    return JsonResponse(body, status=200 if body["ok"] else 503)


@login_required
@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    """The user's guests and requests (everyone's for staff)."""
    guests = Guest.objects.select_related("host", "template", "owner").exclude(
        state=Guest.State.UNDEFINED
    )
    requests = ProvisioningRequest.objects.select_related("template").order_by("-created")
    if not request.user.is_staff:
        guests = guests.filter(owner_id=request.user.pk)
        requests = requests.filter(owner_id=request.user.pk)
    query = request.GET.get("q", "").strip()[:100]
    if query:
        guests = guests.filter(Q(name__icontains=query) | Q(owner__username__icontains=query))
    page = Paginator(guests.order_by("name", "id"), PAGE_SIZE).get_page(request.GET.get("page"))
    context = {"page": page, "query": query, "requests": requests[:10]}
    return render(request, "provisioning/dashboard.html", context)
