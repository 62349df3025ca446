"""Views: thin functions that check access, call one service, and render a page or a partial."""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import (
    require_GET,
    require_http_methods,
    require_POST,
    require_safe,
)

from . import health, selectors
from .forms import ApiTokenForm, AuditFilterForm, NewGuestForm, SshKeyForm
from .models import (
    ApiToken,
    AuditEvent,
    ConsoleSession,
    Guest,
    GuestTemplate,
    Host,
    Job,
    RebuildSchedule,
    SshKey,
)
from .services import (
    actions,
    answer_files,
    consoles,
    keys,
    migrate,
    provision,
    schedules,
    snapshots,
    tokens,
    transitions,
)

PAGE_SIZE = 50
STOP_POLLING = 286  # htmx stops polling on this status


@require_safe
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    """Every part's health as JSON; 503 when any part is down."""
    body = health.as_json(health.run_all())
    return JsonResponse(body, status=200 if body["ok"] else 503)


# --- access ---


def _user(request: HttpRequest) -> User:
    """The logged-in user (every view here requires one)."""
    assert isinstance(request.user, User)
    return request.user


def _partial(request: HttpRequest, template: str, name: str) -> str:
    """The whole page, or only the named partial for an htmx request."""
    return f"{template}#{name}" if getattr(request, "htmx", False) else template


# --- dashboard ---


@login_required
@require_safe
def dashboard(request: HttpRequest) -> HttpResponse:
    """The user's guests, requests and quota use (everyone's guests for staff)."""
    filters = selectors.GuestFilters(
        query=request.GET.get("q", "").strip()[:100],
        owner=request.GET.get("owner", "").strip()[:150],
        host=request.GET.get("host", "").strip()[:63],
    )
    guests = selectors.guest_list(user=request.user, filters=filters)
    page = Paginator(guests, PAGE_SIZE).get_page(request.GET.get("page"))
    page.object_list = list(page.object_list)  # read once: the rows get their sparklines
    selectors.cpu_sparklines(page.object_list)
    # One query serves both the unreachable badges and the staff's host filter.
    hosts = list(Host.objects.only("pk", "name", "last_seen"))
    context: dict[str, Any] = {
        "page": page,
        "query": filters.query,
        "owner": filters.owner,
        "host": filters.host,
        "down_hosts": selectors.hosts_down(hosts),
    }
    if not getattr(request, "htmx", False):
        context.update(selectors.dashboard_extras(request.user, hosts))
    return render(request, _partial(request, "provisioning/dashboard.html", "guest-table"), context)


# --- new guest ---


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def new_guest(request: HttpRequest) -> HttpResponse:
    """Template cards; with a template chosen, its form; on POST, the request is made."""
    templates = GuestTemplate.objects.filter(enabled=True).select_related("media")
    chosen = request.GET.get("template") or request.POST.get("template")
    context: dict[str, Any] = {"templates": templates}
    if not chosen:
        context["quota"] = selectors.quota_bars(_user(request))
        return render(request, "provisioning/new_guest.html", context)
    try:
        template = templates.get(pk=int(chosen))
    except (ValueError, GuestTemplate.DoesNotExist):
        raise Http404("No such template") from None
    form = NewGuestForm(request.POST or None, template=template, owner=_user(request))
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
    context.update(
        template=template,
        form=form,
        quota=selectors.quota_bars(_user(request)),
        left=selectors.quota_left(_user(request)),
    )
    status = 400 if request.method == "POST" else 200
    return render(request, "provisioning/new_guest.html", context, status=status)


# --- profile: SSH keys ---


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def ssh_keys(request: HttpRequest) -> HttpResponse:
    """The user's SSH public keys and a form to add one."""
    owner = _user(request)
    form = SshKeyForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            key = keys.ssh_key_add(
                owner=owner, name=form.cleaned_data["name"], text=form.cleaned_data["public_key"]
            )
        except keys.SshKeyError as exc:
            form.add_error(exc.field, str(exc))
            if exc.secret:
                form.forget_public_key()
        else:
            messages.success(request, f"Added the key {key.name}.")
            return redirect("ssh-keys")
    rows = [(key, key.public_key.split(maxsplit=1)[0]) for key in owner.ssh_keys.all()]
    return render(request, "provisioning/ssh_keys.html", {"form": form, "keys": rows})


@login_required
@require_POST
def ssh_key_remove(request: HttpRequest, pk: int) -> HttpResponse:
    """Remove one of the user's keys (guests that have it keep it)."""
    try:
        key = keys.ssh_key_remove(owner=_user(request), key_id=pk)
    except SshKey.DoesNotExist:
        raise Http404("No such key") from None
    messages.success(request, f"Removed the key {key.name}.")
    return redirect("ssh-keys")


# --- requests ---


@login_required
@require_safe
def request_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """A request's steps, progress, console and outcome; the partial stops polling once final."""
    req = get_object_or_404(
        selectors.requests_of(request.user).select_related("template", "host", "guest", "owner"),
        pk=pk,
    )
    context = selectors.request_status(req)
    name = _partial(request, "provisioning/request_detail.html", "request-status")
    status = STOP_POLLING if getattr(request, "htmx", False) and req.is_final else 200
    return render(request, name, context, status=status)


@login_required
@require_POST
def request_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    """Cancel a request that is still in progress."""
    req = get_object_or_404(selectors.requests_of(request.user), pk=pk)
    try:
        provision.cancel(req.pk)
    except transitions.TransitionError:
        messages.error(request, f"{req.name} can no longer be cancelled: it is {req.status}.")
    else:
        messages.success(request, f"Cancelled {req.name}.")
    return redirect("request-detail", pk=req.pk)


# --- guests ---


@login_required
@require_safe
def guest_detail(request: HttpRequest, uuid: str) -> HttpResponse:
    """A guest's state, configuration, actions and history."""
    guest = get_object_or_404(
        selectors.guests_of(request.user).select_related("host", "template", "owner"), uuid=uuid
    )
    context = selectors.guest_status(guest)
    if getattr(request, "htmx", False):
        return render(request, "provisioning/guest_detail.html#guest-status", context)
    xml, xml_error = selectors.guest_xml(guest)
    context.update(
        xml=xml,
        xml_error=xml_error,
        console=selectors.console_tail(guest),
        stats_interval=settings.STATS_INTERVAL,
    )
    return render(request, "provisioning/guest_detail.html", context)


@login_required
@require_safe
def guest_stats(request: HttpRequest, uuid: str) -> JsonResponse:
    """The guest's usage graphs' data for ?range=hour (default), day or week, as JSON columns."""
    guest = get_object_or_404(selectors.guests_of(request.user), uuid=uuid)
    range_name = request.GET.get("range", "hour")
    try:
        data = selectors.guest_graphs(guest, range_name)
    except KeyError:
        return JsonResponse(
            {"error": f"range must be one of hour, day, week (not {range_name[:20]!r})"},
            status=400,
        )
    except redis.RedisError:
        return JsonResponse(
            {"error": "The graphs are unavailable: Redis does not answer."}, status=503
        )
    response = JsonResponse(data)
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def guest_action(request: HttpRequest, uuid: str, kind: str) -> HttpResponse:
    """Start a lifecycle action on the guest as a job."""
    guest = get_object_or_404(selectors.guests_of(request.user).select_related("host"), uuid=uuid)
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
        return render(
            request, "provisioning/guest_detail.html#guest-status", selectors.guest_status(guest)
        )
    return redirect("guest-detail", uuid=guest.uuid)


def _after_snapshot_ask(request: HttpRequest, guest: Guest) -> HttpResponse:
    if getattr(request, "htmx", False):
        guest.refresh_from_db()
        return render(
            request, "provisioning/guest_detail.html#guest-status", selectors.guest_status(guest)
        )
    return redirect("guest-detail", uuid=guest.uuid)


@login_required
@require_POST
def snapshot_take(request: HttpRequest, uuid: str) -> HttpResponse:
    """Take a snapshot of the guest (a job)."""
    guest = get_object_or_404(selectors.guests_of(request.user).select_related("host"), uuid=uuid)
    try:
        job = snapshots.snapshot_take(
            guest=guest,
            by=_user(request),
            name=request.POST.get("name", "")[:100],
            description=request.POST.get("description", "")[:500],
        )
    except (snapshots.SnapshotRefused, transitions.GuestBusy) as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Snapshot {job.data['name']} queued.")
    return _after_snapshot_ask(request, guest)


@login_required
@require_POST
def snapshot_change(request: HttpRequest, uuid: str, name: str, kind: str) -> HttpResponse:
    """Revert the guest to one of its snapshots, or delete one (a job)."""
    guest = get_object_or_404(selectors.guests_of(request.user).select_related("host"), uuid=uuid)
    snapshot = get_object_or_404(guest.snapshots, name=name)
    if kind == "revert" and request.POST.get("confirm") != snapshot.name:
        messages.error(
            request, f"Type the snapshot's name ({snapshot.name}) to confirm reverting to it."
        )
        return _after_snapshot_ask(request, guest)
    ask = snapshots.snapshot_revert if kind == "revert" else snapshots.snapshot_delete
    try:
        ask(guest=guest, name=snapshot.name, by=_user(request))
    except (snapshots.SnapshotRefused, transitions.GuestBusy) as exc:
        messages.error(request, str(exc))
    else:
        done = "Revert to" if kind == "revert" else "Deleting"
        messages.success(request, f"{done} {snapshot.name} queued.")
    return _after_snapshot_ask(request, guest)


@login_required
@require_POST
def guest_rebuild(request: HttpRequest, uuid: str) -> HttpResponse:
    """Rebuild the guest from its template now."""
    guest = get_object_or_404(
        selectors.guests_of(request.user).select_related("host", "template"), uuid=uuid
    )
    latest = request.POST.get("source", "latest") == "latest"
    # A checkbox: absent means unticked. Kept when the form has no such box (no data disk).
    keep = request.POST.get("keep_data_disk", "on" if not guest.data_disk_mib else "") == "on"
    try:
        made = provision.rebuild_submit(
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
    """Add a rebuild or snapshot schedule to the guest (every N minutes, or cron)."""
    guest = get_object_or_404(
        selectors.guests_of(request.user).select_related("template"), uuid=uuid
    )
    raw_minutes = request.POST.get("every_minutes", "").strip()
    raw_keep = request.POST.get("keep", "").strip()
    try:
        minutes = int(raw_minutes) if raw_minutes else None
    except ValueError:
        messages.error(request, "The interval must be a whole number of minutes.")
        return redirect("guest-detail", uuid=guest.uuid)
    try:
        keep = int(raw_keep) if raw_keep else None
    except ValueError:
        messages.error(request, "The number of snapshots kept must be a whole number.")
        return redirect("guest-detail", uuid=guest.uuid)
    try:
        schedules.schedule_create(
            action=request.POST.get("action", RebuildSchedule.Action.REBUILD)[:10],
            keep=keep,
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
    guest = get_object_or_404(selectors.guests_of(request.user), uuid=uuid)
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
        job = migrate.migration_start(guest=guest, by=_user(request), dest=dest)
    except (migrate.MigrationRefused, transitions.GuestBusy) as exc:
        messages.error(request, f"Cannot migrate: {exc}.")
    else:
        how = "live" if job.data["live"] else "offline"
        messages.success(request, f"Migration queued ({how}).")
    return redirect("guest-detail", uuid=guest.uuid)


@login_required
@require_POST
def job_cancel(request: HttpRequest, uuid: str, pk: int) -> HttpResponse:
    """Cancel a running migration of a guest (the guest stays on its source host)."""
    guest = get_object_or_404(selectors.guests_of(request.user), uuid=uuid)
    job = get_object_or_404(Job, pk=pk, guest=guest)
    if job.kind != Job.Kind.MIGRATE or not request.user.is_staff:
        raise Http404("No such job")
    if migrate.migration_cancel(job=job):
        messages.success(request, "Cancelling the migration.")
    else:
        messages.error(request, "The migration has already ended.")
    return redirect("guest-detail", uuid=guest.uuid)


# --- browser consoles ---


@login_required
@require_POST
def console_token(request: HttpRequest, uuid: str, kind: str) -> JsonResponse:
    """A one-time token for the guest's serial terminal or screen, and the socket to use it on."""
    guest = get_object_or_404(selectors.guests_of(request.user), uuid=uuid)
    try:
        token = consoles.mint_token(guest=guest, user=_user(request), kind=kind)
    except consoles.ConsoleRefused as refused:
        status = 409 if refused.code == consoles.NOT_RUNNING else 404
        return JsonResponse({"error": refused.reason, "code": refused.code}, status=status)
    return JsonResponse(
        {"token": token, "url": f"/ws/guests/{guest.uuid}/console/{kind}?token={token}"}
    )


@login_required
@require_safe
def console_page(request: HttpRequest, uuid: str, kind: str) -> HttpResponse:
    """The serial terminal or the screen of a guest, filling the window."""
    guest = get_object_or_404(selectors.guests_of(request.user), uuid=uuid)
    if kind not in ConsoleSession.Kind.values:
        raise Http404("No such console")
    return render(request, "provisioning/console.html", {"guest": guest, "kind": kind})


# --- answer files (fetched by installers, not by people) ---


@require_GET  # not HEAD: the token is good for one fetch, which HEAD would spend
@never_cache
def answer_file(request: HttpRequest, token: str) -> HttpResponse:
    """A request's answer file, once, while its installer runs: 404 or 410 otherwise."""
    try:
        content = answer_files.answer_fetch(token=token, client=request.META.get("REMOTE_ADDR", ""))
    except answer_files.AnswerGone as gone:
        return HttpResponse(f"{gone.reason}\n", status=gone.status, content_type="text/plain")
    return HttpResponse(content, content_type="text/plain; charset=utf-8")


# --- profile: API tokens ---


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
@never_cache
def api_tokens(request: HttpRequest) -> HttpResponse:
    """The user's API tokens and a form to make one; a new token is shown on this answer only."""
    owner = _user(request)
    form = ApiTokenForm(request.POST or None)
    made = None
    if request.method == "POST" and form.is_valid():
        try:
            made = tokens.token_create(
                user=owner,
                name=form.cleaned_data["name"],
                scope=form.cleaned_data["scope"],
                days=form.cleaned_data["days"],
            )
        except tokens.TokenError as exc:
            form.add_error(exc.field if exc.field in form.fields else None, str(exc))
        else:
            form = ApiTokenForm()
    # The secret is rendered here and kept nowhere: no redirect, no message, no session.
    context = {"form": form, "made": made, "tokens": owner.api_tokens.all(), "now": timezone.now()}
    status = 400 if request.method == "POST" and made is None else 200
    return render(request, "provisioning/api_tokens.html", context, status=status)


@login_required
@require_POST
def api_token_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    """Revoke one of the user's tokens: it stops working at once."""
    try:
        token = tokens.token_revoke(user=_user(request), token_id=pk)
    except ApiToken.DoesNotExist:
        raise Http404("No such token") from None
    messages.success(request, f"Revoked the token {token.name}.")
    return redirect("api-tokens")


# --- staff: the audit log ---

AUDIT_CSV_COLUMNS = (
    "created",
    "actor",
    "channel",
    "token",
    "source_ip",
    "action",
    "object_type",
    "object_id",
    "object_repr",
    "result",
    "changes",
    "detail",
)
_AUDIT_CSV_FIELDS = (
    "created",
    "actor_name",
    "channel",
    "token_name",
    "source_ip",
    "action",
    "object_type",
    "object_id",
    "object_repr",
    "result",
    "changes",
    "detail",
    "id",
)
AUDIT_CSV_CHUNK = 1000
# A spreadsheet runs a cell that starts with one of these as a formula.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _staff_only(request: HttpRequest) -> None:
    if not request.user.is_staff:
        raise Http404("No such page")


@login_required
@require_safe
@never_cache
def audit_log(request: HttpRequest) -> HttpResponse:
    """Staff: the audit log, newest first, narrowed by the filters, 50 rows a page."""
    _staff_only(request)
    form = AuditFilterForm(request.GET)
    valid = form.is_valid()
    page = Paginator(form.events() if valid else AuditEvent.objects.none(), PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    name = _partial(request, "provisioning/audit.html", "audit-table")
    return render(request, name, {"form": form, "page": page}, status=200 if valid else 400)


@login_required
@require_safe
@never_cache
def audit_export(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
    """Staff: the rows the filters select, as CSV, streamed."""
    _staff_only(request)
    form = AuditFilterForm(request.GET)
    if not form.is_valid():
        problems = "; ".join(
            f"{name}: {' '.join(str(m) for m in errors)}" for name, errors in form.errors.items()
        )
        return HttpResponse(f"{problems}\n", status=400, content_type="text/plain")
    response = StreamingHttpResponse(_audit_csv(form.events()), content_type="text/csv")
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    response["Content-Disposition"] = f'attachment; filename="audit-{stamp}.csv"'
    return response


class _Echo:
    """csv.writer's file: each row written comes back as the string."""

    def write(self, value: str) -> str:
        return value


def _csv_cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return f"'{text}" if text.startswith(_FORMULA_STARTS) else text


def _csv_row(values: Sequence[Any]) -> list[str]:
    created, *middle, changes, detail = values
    return [
        created.isoformat(),
        *(_csv_cell(v) for v in middle),
        _csv_cell(json.dumps(changes, ensure_ascii=False, sort_keys=True) if changes else ""),
        _csv_cell(detail),
    ]


def _rows(rows: QuerySet[Any, tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return list(rows)


async def _audit_csv(events: QuerySet[AuditEvent]) -> AsyncIterator[str]:
    """The header, then the rows a chunk (one query) at a time, resuming after the last."""
    writer = csv.writer(_Echo())
    yield writer.writerow(AUDIT_CSV_COLUMNS)
    rows = events.values_list(*_AUDIT_CSV_FIELDS)
    after: Q | None = None
    while True:
        chunk = rows.filter(after) if after is not None else rows
        got = await sync_to_async(_rows)(chunk[:AUDIT_CSV_CHUNK])
        for values in got:
            yield writer.writerow(_csv_row(values[:-1]))
        if len(got) < AUDIT_CSV_CHUNK:
            return
        # The order is (-created, -id): the next chunk is what comes after the last row.
        created, pk = got[-1][0], got[-1][-1]
        after = Q(created__lt=created) | Q(created=created, id__lt=pk)
