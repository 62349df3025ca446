"""Making a request: a new guest from a template, or a rebuild of one, checked and queued."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from provisioning import answers, cloudinit, queue
from provisioning.hypervisor import domxml
from provisioning.models import (
    NAME_VALIDATOR,
    AnswerFile,
    Guest,
    GuestTemplate,
    Host,
    Job,
    ProvisioningRequest,
    TemplateVersion,
    answer_base,
    answer_url_length,
)
from provisioning.services import audit, placement, transitions
from provisioning.services.hosts import host_ensure_local

Status = ProvisioningRequest.Status


class SubmitError(ValueError):
    """A request that cannot be made, with a message per form field."""

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))


@dataclass(frozen=True)
class Overrides:
    """What the user picked within the template's ranges (None: the template's default)."""

    name: str
    vcpus: int | None = None
    memory_mib: int | None = None
    disk_mib: int | None = None
    data_disk_mib: int | None = None
    start_paused: bool | None = None
    autostart: bool | None = None
    autodestroy: bool | None = None
    ssh_keys: tuple[str, ...] = ()  # authorized_keys lines cloud-init puts on the guest
    cloud_config: str = ""  # the owner's own cloud-config, merged into the template's


def checked(template: GuestTemplate, o: Overrides) -> dict[str, Any]:
    """The request's sizes and options, the template's defaults filled in; SubmitError if off."""
    errors: dict[str, str] = {}
    values: dict[str, Any] = {}
    try:
        NAME_VALIDATOR(o.name)
    except Exception:  # noqa: BLE001 - the validator's message is for forms; say it plainly
        errors["name"] = "Use 1-63 letters, digits, dots, dashes or underscores."
    for field in GuestTemplate.SIZES:
        picked = getattr(o, field)
        value = template.size_range(field)[1] if picked is None else picked
        problem = template.size_problem(field, value)
        if problem:
            errors[field] = problem
        values[field] = value
    transient = template.lifecycle == GuestTemplate.Lifecycle.TRANSIENT
    for option in ("start_paused", "autostart", "autodestroy"):
        picked = getattr(o, option)
        values[option] = getattr(template, option) if picked is None else bool(picked)
    if values["autostart"] and transient:
        errors["autostart"] = "Transient guests cannot autostart."
    if values["autodestroy"] and not transient:
        errors["autodestroy"] = "Only transient guests can be autodestroyed."
    values["cloud_config"] = ""
    if o.cloud_config.strip():
        problem = _cloud_config_problem(template, o.cloud_config)
        if problem:
            errors["cloud_config"] = problem
        values["cloud_config"] = o.cloud_config
    if errors:
        raise SubmitError(errors)
    return values


def _cloud_config_problem(template: GuestTemplate, text: str) -> str | None:
    """Why the owner's cloud-config cannot go on a guest of this template, or None."""
    if template.method != GuestTemplate.Method.CLOUD:
        return "Only cloud images take a cloud-config."
    if not template.user_cloud_config:
        return "This template takes no cloud-config of yours."
    try:
        cloudinit.parse_cloud_config(
            text,
            schema=cloudinit.load_schema(settings.CLOUD_CONFIG_SCHEMA),
            allow_fetch=template.cloud_config_fetches,
        )
    except cloudinit.CloudConfigError as exc:
        return str(exc)
    return None


def request_place(*, template: GuestTemplate, values: dict[str, Any]) -> Host:
    """The host a new guest goes to (call inside the transaction that records the guest)."""
    sizes = {
        "vcpus": values["vcpus"],
        "memory_mib": values["memory_mib"],
        "disk_mib": values["disk_mib"] + values["data_disk_mib"],
    }
    try:
        try:
            return placement.place(template=template, **sizes)
        except placement.NoRoom:
            if Host.objects.exists():
                raise
        host_ensure_local()  # a fresh install: the local libvirt is the first host
        return placement.place(template=template, **sizes)
    except placement.NoRoom as exc:
        raise SubmitError({"template": f"Cannot place the guest: {exc}."}) from exc


def _name_taken(host: Host, name: str) -> bool:
    """A guest of that name exists on the host, or is being built there."""
    building = ProvisioningRequest.objects.filter(status__in=ProvisioningRequest.ACTIVE)
    return (
        Guest.objects.filter(host=host, name=name)
        .filter(~Q(state=Guest.State.UNDEFINED) | Q(pk__in=building.values("guest_id")))
        .exists()
    )


def request_submit(
    *, owner: User, template: GuestTemplate, overrides: Overrides
) -> ProvisioningRequest:
    """Record a request (with its guest row and job) and queue its first step after commit."""
    try:
        return _request_submit(owner=owner, template=template, overrides=overrides)
    except SubmitError as exc:
        audit.refused("request.create", template, str(exc), by=owner, object_repr=overrides.name)
        raise


def _request_submit(
    *, owner: User, template: GuestTemplate, overrides: Overrides
) -> ProvisioningRequest:
    if not template.enabled:
        raise SubmitError({"template": "This template is not offered any more."})
    values = checked(template, overrides)
    cloud_config = values.pop("cloud_config")
    taken = SubmitError({"name": f"A guest named {overrides.name} exists already."})
    try:
        with transaction.atomic():
            host = request_place(template=template, values=values)
            if _name_taken(host, overrides.name):
                raise taken
            guest = Guest.objects.create(
                owner=owner,
                host=host,
                template=template,
                template_version=template.version,
                name=overrides.name,
                mac=domxml.random_mac(),
                vcpus=values["vcpus"],
                memory_mib=values["memory_mib"],
                disk_mib=values["disk_mib"],
                data_disk_mib=values["data_disk_mib"],
                ssh_keys=list(overrides.ssh_keys),
                cloud_config=cloud_config,
                autodestroy=values["autodestroy"],
            )
            request = ProvisioningRequest.objects.create(
                owner=owner,
                template=template,
                template_version=template.version,
                host=host,
                guest=guest,
                name=overrides.name,
                **values,
            )
            transitions.job_open(
                kind=Job.Kind.PROVISION,
                guest=guest,
                request=request,
                created_by=owner,
                note=f"Requested {template} on {host}",
                progress=0,
                new_guest=True,
            )
            if template.answer_file.strip():
                answer_file_make(request=request, guest=guest, template=template)
            audit.record(
                "request.create",
                request,
                by=owner,
                changes={
                    "guest": (None, str(guest.uuid)),
                    "template": (None, f"{template.name} v{template.version}"),
                    "host": (None, host.name),
                    **{k: (None, v) for k, v in values.items() if v},
                },
            )
            queue.send_on_commit(queue.ADVANCE_REQUEST, request.pk, queue=host.queue)
    except IntegrityError as exc:
        raise taken from exc
    return request


def answer_file_make(
    *, request: ProvisioningRequest, guest: Guest, template: GuestTemplate
) -> AnswerFile:
    """Render the template's answer file for this request, once, behind a one-time token.

    SubmitError (in the caller's transaction, so nothing stays) when the portal has no address
    for the host's guests, or the file does not render or is too big.
    """
    by_url = template.answer_delivery == GuestTemplate.AnswerDelivery.URL
    if by_url and not answer_base(request.host):
        raise SubmitError(
            {
                "template": f"{template.name} installs from an answer file, but the portal's "
                "address as guests reach it is not set (VMPORTAL_ANSWER_BASE_URL, or the "
                "host's answer address)"
            }
        )
    context = answers.context_for(
        name=guest.name,
        uuid=str(guest.uuid),
        mac=guest.mac,
        ssh_keys=guest.ssh_keys,
        vcpus=guest.vcpus,
        memory_mib=guest.memory_mib,
        disk_mib=guest.disk_mib,
        password_hash=answers.password_hash(answers.one_time_password()),
    )
    try:
        content = answers.render(template.answer_file, context)
    except answers.AnswerFileError as exc:
        raise SubmitError({"template": f"the answer file of {template.name}: {exc}"}) from exc
    url_problem = answers.cmdline_problem(
        template.kernel_cmdline,
        answer_file=True,
        url_length=answer_url_length(request.host),
        by_url=by_url,
    )
    if url_problem:
        raise SubmitError({"template": f"{template.name}: {url_problem}"})
    minutes = template.install_timeout_minutes + 10
    return AnswerFile.objects.create(
        request=request,
        token=secrets.token_urlsafe(32),
        content=content,
        expires=timezone.now() + timedelta(minutes=minutes),
    )


def rebuild_submit(
    *, guest: Guest, by: User | None, latest: bool = True, keep_data_disk: bool = True
) -> ProvisioningRequest:
    """Rebuild a guest from its template (keeping name, UUID and MAC); GuestBusy if it is busy.

    The system disk is always made anew; the data disk (if the guest has one) is kept as it is,
    or made anew and empty when keep_data_disk is false.
    """
    try:
        return _rebuild_submit(guest=guest, by=by, latest=latest, keep_data_disk=keep_data_disk)
    except (SubmitError, transitions.GuestBusy) as exc:
        audit.refused("guest.rebuild", guest, str(exc), by=by)
        raise


def _rebuild_submit(
    *, guest: Guest, by: User | None, latest: bool, keep_data_disk: bool
) -> ProvisioningRequest:
    template = guest.template
    if template is None:
        raise SubmitError({"template": f"{guest.name} was not made from a template."})
    if guest.state == Guest.State.UNDEFINED:
        raise SubmitError({"guest": f"{guest.name} does not exist any more."})
    version = (
        template.version if latest or guest.template_version is None else guest.template_version
    )
    if (
        version != template.version
        and not TemplateVersion.objects.filter(template=template, version=version).exists()
    ):
        # Building today's template while recording the old version would mislead everyone.
        raise SubmitError(
            {"template": f"v{version} of {template.name} was not kept; rebuild from the latest."}
        )
    data = ""
    if guest.data_disk_mib:
        data = ", keeping the data disk" if keep_data_disk else ", with an empty data disk"
    with transaction.atomic():
        job = transitions.job_open(
            kind=Job.Kind.REBUILD,
            guest=guest,
            created_by=by,
            note=f"Rebuild from {template.name} v{version} requested{data}",
            progress=0,
        )
        request = ProvisioningRequest.objects.create(
            kind=ProvisioningRequest.Kind.REBUILD,
            owner=guest.owner,
            template=template,
            template_version=version,
            host=guest.host,
            guest=guest,
            name=guest.name,
            vcpus=guest.vcpus,
            memory_mib=guest.memory_mib,
            disk_mib=guest.disk_mib,
            data_disk_mib=guest.data_disk_mib,
            keep_data_disk=keep_data_disk,
            autostart=guest.autostart,
            autodestroy=guest.autodestroy,
        )
        Job.objects.filter(pk=job.pk).update(request=request)
        Guest.objects.filter(pk=guest.pk).update(template_version=version)
        if template.answer_file.strip():
            answer_file_make(request=request, guest=guest, template=template)
        audit.record(
            "guest.rebuild",
            guest,
            by=by,
            changes={"template_version": (guest.template_version, version)},
            detail=f"request #{request.pk}{data}",
        )
        queue.send_on_commit(queue.ADVANCE_REQUEST, request.pk, queue=guest.host.queue)
    return request
