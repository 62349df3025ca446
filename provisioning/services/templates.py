"""Templates: versions, and what their domain XML looks like and whether libvirt accepts it."""

from __future__ import annotations

import uuid as uuidlib

from django.db import transaction
from django.db.models import F

from provisioning import answers, cloudinit
from provisioning.hypervisor import domxml, operations, storage
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.hypervisor.errors import HypervisorError, NotFound
from provisioning.models import (
    Guest,
    GuestTemplate,
    Host,
    ProvisioningRequest,
    StoragePool,
    TemplateVersion,
)
from provisioning.services.hosts import host_ensure_local
from provisioning.services.provision import Plan, StepFailed

PREVIEW_UUID = "00000000-0000-4000-8000-000000000001"


# The fields that decide how a guest is built; a version's snapshot keeps them.
SNAPSHOT_FIELDS = (
    "method",
    "lifecycle",
    "media_id",
    "network_id",
    "pool_id",
    "base_volume",
    "host_id",
    "kernel_cmdline",
    "answer_file",
    "answer_delivery",
    "final_boot",
    "bootloader_path",
    "install_timeout_minutes",
    "cloud_config",
    "cloud_user",
    "user_cloud_config",
    "cloud_config_fetches",
    "name",
)


def template_saved(*, template: GuestTemplate, changed: bool) -> GuestTemplate:
    """A saved change makes a new version; guests and requests keep the one they were built from."""
    with transaction.atomic():
        if changed:
            GuestTemplate.objects.filter(pk=template.pk).update(version=F("version") + 1)
            template.refresh_from_db(fields=["version"])
        TemplateVersion.objects.update_or_create(
            template=template,
            version=template.version,
            defaults={"fields": {f: getattr(template, f) for f in SNAPSHOT_FIELDS}},
        )
    return template


def _plan(template: GuestTemplate, *, name: str, uuid: str) -> Plan:
    host: Host = template.host or host_ensure_local()
    pool = template.pool or host.pools.filter(for_guest_disks=True).first()
    if pool is None:
        pool = StoragePool(host=host, name="default", path="/var/lib/libvirt/images")
    guest = Guest(
        host=host,
        name=name,
        uuid=uuidlib.UUID(uuid),
        mac="52:54:00:00:00:01",
        vcpus=template.vcpus_default,
        memory_mib=template.memory_mib_default,
        disk_mib=template.disk_mib_default,
        data_disk_mib=template.data_disk_mib_default,
    )
    request = ProvisioningRequest(pk=0, template=template, template_version=template.version)
    domain_type = host.detected_domain_type or (
        host.domain_type if host.domain_type != Host.DomainType.AUTO else "qemu"
    )
    return Plan(request, guest, host, template, pool, domain_type=domain_type)


def template_preview(template: GuestTemplate) -> dict[str, str]:
    """Both phases' domain XML for an example guest (and a cloud image's seed documents), or
    the reason there is none."""
    plan = _plan(template, name="example", uuid=PREVIEW_UUID)
    plan.guest.ssh_keys = ["ssh-ed25519 AAAA...(the owner's chosen keys) owner@example"]
    try:
        spec = plan.spec()
        final = domxml.pretty(domxml.final_xml(spec))
        install = domxml.pretty(domxml.install_xml(spec)) if plan.installs else ""
        seed = cloudinit.read_seed_iso(plan.seed()) if plan.cloud else {}
    except (domxml.SpecError, StepFailed) as exc:
        return {"error": str(exc)}
    preview = {"install": install, "final": final}
    for name in ("meta-data", "user-data", "network-config"):
        if name in seed:
            preview[name] = seed[name].decode()
    if template.answer_file.strip():
        try:
            preview["answer-file"] = answers.render(template.answer_file, answers.sample_context())
        except answers.AnswerFileError as exc:
            preview["answer-file"] = f"(does not render: {exc})"
    return preview


def template_base_problem(template: GuestTemplate) -> str | None:
    """Why a cloud image's or import's base volume cannot back guests, or None when it can."""
    if template.method not in (GuestTemplate.Method.CLOUD, GuestTemplate.Method.IMPORT):
        return None
    if not template.base_volume:
        return None  # the model's own check says so
    plan = _plan(template, name="example", uuid=PREVIEW_UUID)
    try:
        volume = storage.get_volume(plan.hv, plan.pool.name, template.base_volume)
    except NotFound:
        return f"There is no volume {template.base_volume} in pool {plan.pool.name} on {plan.host}."
    except HypervisorError as exc:
        return f"Could not look for it on {plan.host}: {exc}"
    if volume.format not in domxml.DISK_FORMATS:
        return f"It is a {volume.format or 'unknown'} volume; use a qcow2 or raw image."
    return None


def template_validate(template: GuestTemplate) -> list[str]:
    """Define both phases' XML with validation on (then undefine them); the problems found."""
    problems: list[str] = []
    uuid = str(uuidlib.uuid4())
    plan = _plan(template, name=f"vmportal-validate-{uuid[:8]}", uuid=uuid)
    try:
        spec = plan.spec()
        documents = {"final": domxml.final_xml(spec)}
        if plan.installs:
            documents["install"] = domxml.install_xml(spec)
    except domxml.SpecError as exc:
        return [str(exc)]
    hv = get_hypervisor(plan.host.uri)
    for phase, xml in documents.items():
        try:
            operations.define(hv, xml)
        except HypervisorError as exc:
            problems.append(f"{phase} phase: {exc}")
        finally:
            try:
                operations.undefine(hv, uuid)
            except HypervisorError as exc:
                problems.append(f"cleanup: {exc}")
    return problems
