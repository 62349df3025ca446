"""Views: thin functions that check access, call one service, and render a page or a partial."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from . import health
from .forms import NewGuestForm
from .hypervisor import domxml, operations
from .hypervisor.connection import get_hypervisor
from .hypervisor.errors import HypervisorError
from .models import (
    Guest,
    GuestTemplate,
    Host,
    Job,
    JobEvent,
    ProvisioningRequest,
    RebuildSchedule,
    ScheduleRun,
)
from .services import (
    actions,
    consoles,
    migrations,
    placement,
    provision,
    quotas,
    schedules,
    transitions,
)

PAGE_SIZE = 50
STOP_POLLING = 286  # htmx stops polling on this status


@require_GET
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    """Every part's health as JSON; 503 when any part is down."""
    body = health.as_json(health.run_all())
    return JsonResponse(body, status=200 if body["ok"] else 503)


# --- access ---


def _guests_of(request: HttpRequest) -> QuerySet[Guest]:
    guests = Guest.objects.all()
    return guests if request.user.is_staff else guests.filter(owner_id=request.user.pk)


def _requests_of(request: HttpRequest) -> QuerySet[ProvisioningRequest]:
    requests = ProvisioningRequest.objects.all()
    return requests if request.user.is_staff else requests.filter(owner_id=request.user.pk)


def _partial(request: HttpRequest, template: str, name: str) -> str:
    """The whole page, or only the named partial for an htmx request."""
    return f"{template}#{name}" if getattr(request, "htmx", False) else template


# --- dashboard ---


def _user(request: HttpRequest) -> User:
    """The logged-in user (every view here requires one)."""
    assert isinstance(request.user, User)
    return request.user


def _quota_bars(user: User) -> list[dict[str, Any]]:
    usage, limits = quotas.usage_of(user), quotas.limits_of(user)
    bars = []
    for field, label, unit in (
        ("guests", "Guests", ""),
        ("vcpus", "vCPUs", ""),
        ("memory_mib", "Memory", " MiB"),
        ("disk_mib", "Disk", " MiB"),
    ):
        used, most = getattr(usage, field), getattr(limits, field)
        percent = min(100, round(100 * used / most)) if most else 100
        bars.append({"label": label, "used": used, "max": most, "unit": unit, "percent": percent})
    return bars


@login_required
@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    """The user's guests, requests and quota use (everyone's guests for staff)."""
    guests = (
        _guests_of(request)
        .exclude(state=Guest.State.UNDEFINED)
        .select_related("host", "template", "owner")
    )
    query = request.GET.get("q", "").strip()[:100]
    owner = request.GET.get("owner", "").strip()[:150]
    host = request.GET.get("host", "").strip()[:63]
    if query:
        guests = guests.filter(Q(name__icontains=query) | Q(owner__username__icontains=query))
    if request.user.is_staff and owner:
        guests = guests.filter(owner__username=owner)
    if request.user.is_staff and host:
        guests = guests.filter(host__name=host)
    page = Paginator(guests.order_by("name", "id"), PAGE_SIZE).get_page(request.GET.get("page"))
    # One query serves both the unreachable badges and the staff's host filter.
    hosts = list(Host.objects.only("pk", "name", "last_seen"))
    down = {h.pk for h in hosts if placement.host_is_down(h)}
    context: dict[str, Any] = {
        "page": page,
        "query": query,
        "owner": owner,
        "host": host,
        "down_hosts": down,
    }
    if not getattr(request, "htmx", False):
        context["requests"] = (
            _requests_of(request).select_related("template").order_by("-created")[:8]
        )
        context["jobs"] = (
            Job.objects.filter(guest__in=_guests_of(request))
            .select_related("guest")
            .order_by("-created")[:8]
        )
        context["quota"] = _quota_bars(_user(request))
        if request.user.is_staff:
            context["hosts"] = [h.name for h in hosts]
            context["owners"] = list(
                get_user_model()
                .objects.filter(guests__isnull=False)
                .distinct()
                .values_list("username", flat=True)[:200]
            )
    return render(request, _partial(request, "provisioning/dashboard.html", "guest-table"), context)


# --- new guest ---


@login_required
@require_http_methods(["GET", "POST"])
def new_guest(request: HttpRequest) -> HttpResponse:
    """Template cards; with a template chosen, its form; on POST, the request is made."""
    templates = GuestTemplate.objects.filter(enabled=True).select_related("media")
    chosen = request.GET.get("template") or request.POST.get("template")
    context: dict[str, Any] = {"templates": templates, "quota": _quota_bars(_user(request))}
    if not chosen:
        return render(request, "provisioning/new_guest.html", context)
    try:
        template = templates.get(pk=int(chosen))
    except (ValueError, GuestTemplate.DoesNotExist):
        raise Http404("No such template") from None
    form = NewGuestForm(request.POST or None, template=template)
    if request.method == "POST" and form.is_valid():
        try:
            made = provision.request_submit(
                owner=_user(request),
                template=template,
                overrides=form.overrides(),
            )
        except provision.SubmitError as exc:
            for field, message in exc.errors.items():
                form.add_error(field if field in form.fields else None, message)
        else:
            messages.success(request, f"Requested {made.name}.")
            return redirect("request-detail", pk=made.pk)
    usage, limits = quotas.usage_of(_user(request)), quotas.limits_of(_user(request))
    context.update(
        template=template,
        form=form,
        left={
            "guests": limits.guests - usage.guests,
            "vcpus": limits.vcpus - usage.vcpus,
            "memory_mib": limits.memory_mib - usage.memory_mib,
            "disk_mib": limits.disk_mib - usage.disk_mib,
        },
    )
    status = 400 if request.method == "POST" else 200
    return render(request, "provisioning/new_guest.html", context, status=status)


# --- requests ---


def _request_context(req: ProvisioningRequest) -> dict[str, Any]:
    job = req.jobs.filter(kind=Job.Kind.PROVISION).order_by("-created").first()
    steps = list(req.events.all())
    log_lines = (
        list(
            JobEvent.objects.filter(job=job)
            .exclude(kind=JobEvent.Kind.CONSOLE)
            .order_by("created", "id")
        )
        if job
        else []
    )
    console = consoles.console_tail(req.guest.uuid) if req.guest else ""
    return {
        "req": req,
        "job": job,
        "steps": steps,
        "log_lines": log_lines[-30:],
        "console": console,
        "progress": job.progress if job else 0,
        "cancellable": transitions.is_cancellable(req.status),
    }


@login_required
@require_GET
def request_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """A request's steps, progress, console and outcome; the partial stops polling once final."""
    req = get_object_or_404(
        _requests_of(request).select_related("template", "host", "guest", "owner"), pk=pk
    )
    context = _request_context(req)
    name = _partial(request, "provisioning/request_detail.html", "request-status")
    status = STOP_POLLING if getattr(request, "htmx", False) and req.is_final else 200
    return render(request, name, context, status=status)


@login_required
@require_POST
def request_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    """Cancel a request that is still in progress."""
    req = get_object_or_404(_requests_of(request), pk=pk)
    try:
        provision.cancel(req.pk)
    except transitions.TransitionError:
        messages.error(request, f"{req.name} can no longer be cancelled: it is {req.status}.")
    else:
        messages.success(request, f"Cancelled {req.name}.")
    return redirect("request-detail", pk=req.pk)


# --- guests ---


def _guest_context(guest: Guest) -> dict[str, Any]:
    jobs = list(guest.jobs.select_related("created_by").order_by("-created")[:20])
    active = next((j for j in jobs if j.status in Job.ACTIVE), None)
    newer = (
        guest.template is not None
        and guest.template_version is not None
        and guest.template.version > guest.template_version
    )
    schedules = list(
        guest.schedules.select_related("periodic_task__interval", "periodic_task__crontab")
    )
    runs = list(
        ScheduleRun.objects.filter(schedule__guest=guest).select_related("job", "schedule")[:20]
    )
    return {
        "guest": guest,
        "schedules": schedules,
        "runs": runs,
        "can_rebuild": active is None
        and guest.template is not None
        and guest.state != Guest.State.UNDEFINED,
        "jobs": jobs,
        "active_job": active,
        "actions": [] if active else actions.allowed_actions(guest),
        "action_labels": dict(Job.Kind.choices),
        "newer_template": newer,
        "host_down": placement.host_is_down(guest.host),
        "other_hosts": list(Host.objects.exclude(pk=guest.host_id).filter(enabled=True)),
    }


@login_required
@require_GET
def guest_detail(request: HttpRequest, uuid: str) -> HttpResponse:
    """A guest's state, configuration, actions and history."""
    guest = get_object_or_404(
        _guests_of(request).select_related("host", "template", "owner"), uuid=uuid
    )
    context = _guest_context(guest)
    if getattr(request, "htmx", False):
        return render(request, "provisioning/guest_detail.html#guest-status", context)
    xml, xml_error = "", ""
    if guest.state != Guest.State.UNDEFINED:
        try:
            xml = domxml.pretty(
                operations.get_xml(get_hypervisor(guest.host.uri, readonly=True), str(guest.uuid))
            )
        except HypervisorError as exc:
            xml_error = f"Host {guest.host} did not answer: {exc}"
    context.update(xml=xml, xml_error=xml_error, console=consoles.console_tail(guest.uuid))
    return render(request, "provisioning/guest_detail.html", context)


@login_required
@require_POST
def guest_action(request: HttpRequest, uuid: str, kind: str) -> HttpResponse:
    """Start a lifecycle action on the guest as a job."""
    guest = get_object_or_404(_guests_of(request).select_related("host"), uuid=uuid)
    if kind not in Job.Kind.values:
        raise Http404("No such action")
    options: dict[str, Any] = {}
    if kind == Job.Kind.DELETE:
        if request.POST.get("confirm") != guest.name:
            messages.error(request, f"Type the guest's name ({guest.name}) to confirm deleting it.")
            return redirect("guest-detail", uuid=guest.uuid)
        options["keep_disk"] = request.POST.get("keep_disk") == "on"
    if kind == Job.Kind.SHUTDOWN:
        options["force"] = request.POST.get("force") == "on"
    try:
        job = actions.guest_action(guest=guest, kind=kind, by=request.user, **options)  # type: ignore[arg-type]
    except (actions.ActionRefused, transitions.GuestBusy) as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"{job.get_kind_display()} queued.")
    if getattr(request, "htmx", False):
        guest.refresh_from_db()
        return render(request, "provisioning/guest_detail.html#guest-status", _guest_context(guest))
    return redirect("guest-detail", uuid=guest.uuid)


@login_required
@require_POST
def guest_rebuild(request: HttpRequest, uuid: str) -> HttpResponse:
    """Rebuild the guest from its template now."""
    guest = get_object_or_404(_guests_of(request).select_related("host", "template"), uuid=uuid)
    latest = request.POST.get("source", "latest") == "latest"
    # A checkbox: absent means unticked. Kept when the form has no such box (no data disk).
    keep = request.POST.get("keep_data_disk", "on" if not guest.data_disk_mib else "") == "on"
    try:
        made = provision.reprovision_submit(
            guest=guest, by=_user(request), latest=latest, keep_data_disk=keep
        )
    except (provision.SubmitError, transitions.GuestBusy) as exc:
        messages.error(request, str(exc))
        return redirect("guest-detail", uuid=guest.uuid)
    messages.success(request, f"Rebuilding {guest.name}.")
    return redirect("request-detail", pk=made.pk)


@login_required
@require_POST
def schedule_create(request: HttpRequest, uuid: str) -> HttpResponse:
    """Add a rebuild schedule to the guest (every N minutes, or cron)."""
    guest = get_object_or_404(_guests_of(request).select_related("template"), uuid=uuid)
    raw_minutes = request.POST.get("every_minutes", "").strip()
    try:
        minutes = int(raw_minutes) if raw_minutes else None
    except ValueError:
        messages.error(request, "The interval must be a whole number of minutes.")
        return redirect("guest-detail", uuid=guest.uuid)
    try:
        schedules.schedule_create(
            guest=guest,
            by=_user(request),
            every_minutes=minutes,
            cron=request.POST.get("cron", "")[:100],
            latest=request.POST.get("source", "latest") == "latest",
            enabled=request.POST.get("enabled", "on") == "on",
            keep_data_disk=request.POST.get(
                "keep_data_disk", "on" if not guest.data_disk_mib else ""
            )
            == "on",
        )
    except schedules.ScheduleError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, "Schedule added.")
    return redirect("guest-detail", uuid=guest.uuid)


def _schedule_of(request: HttpRequest, uuid: str, pk: int) -> RebuildSchedule:
    guest = get_object_or_404(_guests_of(request), uuid=uuid)
    return get_object_or_404(
        RebuildSchedule.objects.select_related("periodic_task"), guest=guest, pk=pk
    )


@login_required
@require_POST
def schedule_toggle(request: HttpRequest, uuid: str, pk: int) -> HttpResponse:
    """Enable or disable a schedule."""
    schedule = _schedule_of(request, uuid, pk)
    schedules.schedule_set_enabled(schedule=schedule, enabled=not schedule.periodic_task.enabled)
    return redirect("guest-detail", uuid=uuid)


@login_required
@require_POST
def schedule_delete(request: HttpRequest, uuid: str, pk: int) -> HttpResponse:
    """Remove a schedule."""
    schedules.schedule_delete(schedule=_schedule_of(request, uuid, pk))
    messages.success(request, "Schedule removed.")
    return redirect("guest-detail", uuid=uuid)


@login_required
@require_POST
def guest_migrate(request: HttpRequest, uuid: str) -> HttpResponse:
    """Staff: move a guest to another host (live when running, offline when stopped)."""
    if not request.user.is_staff:
        raise Http404("No such page")
    guest = get_object_or_404(Guest.objects.select_related("host"), uuid=uuid)
    dest = None
    if request.POST.get("dest"):
        try:
            dest = Host.objects.get(pk=int(request.POST["dest"]))
        except (ValueError, Host.DoesNotExist):
            messages.error(request, "Pick a destination host from the list.")
            return redirect("guest-detail", uuid=guest.uuid)
    try:
        job = migrations.migration_start(guest=guest, by=_user(request), dest=dest)
    except (migrations.MigrationRefused, transitions.GuestBusy) as exc:
        messages.error(request, f"Cannot migrate: {exc}.")
    else:
        how = "live" if job.data["live"] else "offline"
        messages.success(request, f"Migration queued ({how}).")
    return redirect("guest-detail", uuid=guest.uuid)


@login_required
@require_POST
def job_cancel(request: HttpRequest, uuid: str, pk: int) -> HttpResponse:
    """Cancel a running migration of a guest (the guest stays on its source host)."""
    guest = get_object_or_404(_guests_of(request), uuid=uuid)
    job = get_object_or_404(Job, pk=pk, guest=guest)
    if job.kind != Job.Kind.MIGRATE or not request.user.is_staff:
        raise Http404("No such job")
    if migrations.migration_cancel(job=job):
        messages.success(request, "Cancelling the migration.")
    else:
        messages.error(request, "The migration has already ended.")
    return redirect("guest-detail", uuid=guest.uuid)
