"""What a request asks of libvirt: its guest's disks and the domain XML of both phases."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.db.models import OuterRef, Subquery

from provisioning import answers, cloudinit
from provisioning.hypervisor import domxml
from provisioning.hypervisor.connection import Hypervisor, get_hypervisor
from provisioning.models import (
    AnswerFile,
    Guest,
    GuestTemplate,
    Host,
    Job,
    ProvisioningRequest,
    StoragePool,
    TemplateVersion,
    answer_url,
)
from provisioning.services.consoles import console_log_path
from provisioning.services.hosts import host_domain_type


class StepFailed(Exception):
    """A step met a permanent failure; the request fails with this message."""


def system_volume(guest: Guest) -> str:
    """The name of a guest's system disk (vda) in its pool."""
    return f"{guest.name}-{guest.uuid.hex[:8]}.qcow2"


def data_volume(guest: Guest) -> str:
    """The name of a guest's data disk (vdb), beside its system disk."""
    return f"{guest.name}-{guest.uuid.hex[:8]}-data.qcow2"


def seed_volume(guest: Guest) -> str:
    """The name of a cloud guest's cloud-init seed (a small ISO), beside its system disk."""
    return f"{guest.name}-{guest.uuid.hex[:8]}-seed.iso"


@dataclass
class Plan:
    """A request's guest on its host from its template (as at the request's version), in a pool."""

    request: ProvisioningRequest
    guest: Guest
    host: Host
    template: GuestTemplate
    pool: StoragePool
    domain_type: str | None = None  # None: the host's (probed once)

    @property
    def hv(self) -> Hypervisor:
        return get_hypervisor(self.host.uri)

    @property
    def uuid(self) -> str:
        return str(self.guest.uuid)

    @property
    def volume(self) -> str:
        return system_volume(self.guest)

    @property
    def data_volume(self) -> str | None:
        """The data disk's volume, if the guest has one."""
        return data_volume(self.guest) if self.guest.data_disk_mib else None

    @property
    def cloud(self) -> bool:
        return self.template.method == GuestTemplate.Method.CLOUD

    @property
    def seed_volume(self) -> str | None:
        """The cloud-init seed's volume, for a cloud image."""
        return seed_volume(self.guest) if self.cloud else None

    @property
    def answer_volume(self) -> str | None:
        """The OEMDRV CD-ROM with the answer file, for installs that take it that way."""
        t = self.template
        if t.answer_file.strip() and t.answer_delivery == GuestTemplate.AnswerDelivery.OEMDRV:
            return f"{self.guest.name}-{self.guest.uuid.hex[:8]}-oemdrv.iso"
        return None

    def answer_iso(self) -> bytes:
        """The OEMDRV image of this request's rendered answer file."""
        content = AnswerFile.objects.filter(request=self.request).values_list("content", flat=True)
        found = content.first()
        if found is None:
            raise StepFailed("the request has no answer file, but its template delivers one")
        return answers.oemdrv_iso(found)

    @property
    def volumes(self) -> list[str]:
        """Every volume the guest has: system disk, data disk, seed, answer-file CD-ROM."""
        made = (self.volume, self.data_volume, self.seed_volume, self.answer_volume)
        return [v for v in made if v]

    @property
    def nics(self) -> tuple[domxml.NicSpec, ...]:
        """The guest's NICs: one on the template's network, or none."""
        network = self.template.network
        if network is None:
            return ()
        kind = {"network": "network", "bridge": "bridge"}[network.kind]
        return (domxml.NicSpec(mac=self.guest.mac, **{kind: network.source}),)

    @property
    def installs(self) -> bool:
        """Whether an installer runs before the final config (not for images or one-phase)."""
        t = self.template
        return (
            t.lifecycle == GuestTemplate.Lifecycle.INSTALL
            and t.method not in domxml.ONE_PHASE_METHODS
        )

    @property
    def instance_id(self) -> str:
        """cloud-init's instance-id: the guest's UUID, and a new one for every rebuild (so
        cloud-init runs its once-per-instance modules again)."""
        return f"{self.uuid}-rebuild-{self.request.pk}" if self.rebuild else self.uuid

    def seed(self) -> bytes:
        """The guest's NoCloud seed ISO (StepFailed when a cloud-config no longer passes)."""
        t, g = self.template, self.guest
        try:
            schema = cloudinit.load_schema(settings.CLOUD_CONFIG_SCHEMA)
            template_config = cloudinit.parse_cloud_config(
                t.cloud_config, schema=schema, allow_fetch=t.cloud_config_fetches
            )
            owner_config = (
                cloudinit.parse_cloud_config(
                    g.cloud_config, schema=schema, allow_fetch=t.cloud_config_fetches
                )
                if t.user_cloud_config
                else {}
            )
        except cloudinit.CloudConfigError as exc:
            raise StepFailed(f"cloud-config: {exc}") from None
        user_data = cloudinit.user_data(
            template=template_config,
            owner=owner_config,
            hostname=g.name,
            user=t.cloud_user,
            keys=[str(k) for k in g.ssh_keys],
        )
        return cloudinit.seed_iso(
            meta_data=cloudinit.meta_data(instance_id=self.instance_id, hostname=g.name),
            user_data=user_data,
            network_config=cloudinit.network_config([g.mac] if t.network and g.mac else []),
        )

    @property
    def rebuild(self) -> bool:
        return self.request.kind == ProvisioningRequest.Kind.REBUILD

    @property
    def transient(self) -> bool:
        return self.template.lifecycle == GuestTemplate.Lifecycle.TRANSIENT

    def validate(self, phase: str) -> bool:
        """Whether libvirt should check this phase's XML against its schema.

        Once per template version, host and phase in each process: what differs between the
        guests of one version (names, UUIDs, MACs, sizes) the portal checks itself.
        """
        return _shape(self, phase) not in _VALIDATED

    def validated(self, phase: str) -> None:
        """libvirt accepted this phase's XML with the schema check."""
        _VALIDATED.add(_shape(self, phase))

    def cmdline(self) -> str:
        """The template's kernel command line, {answer_url} made the request's answer URL."""
        line = self.template.kernel_cmdline
        if answers.PLACEHOLDER not in line:
            return line
        if self.request.pk is None:  # the admin's preview
            token = "(one-time-token)"
        else:
            found = AnswerFile.objects.filter(request=self.request).values_list("token", flat=True)
            token = found.first() or ""
            if not token:
                raise StepFailed("the request has no answer file, but its command line names one")
        return line.replace(answers.PLACEHOLDER, answer_url(self.host, token))

    def spec(self) -> domxml.GuestSpec:
        """The guest as the hypervisor layer builds its XML (SpecError when it cannot be)."""
        t, g = self.template, self.guest
        media = domxml.BootMedia()
        boots_kernel = (GuestTemplate.Method.KERNEL, GuestTemplate.Method.CLOUD)
        kernel_media = t.method in boots_kernel or t.final_boot == GuestTemplate.FinalBoot.KERNEL
        if t.media is not None and t.media.kind == "kernel" and kernel_media:
            media = domxml.BootMedia(
                kernel=t.media.kernel_path, initrd=t.media.initrd_path, cmdline=self.cmdline()
            )
        elif t.media is not None and t.method == GuestTemplate.Method.CDROM:
            iso: domxml.VolumeRef | str = (
                domxml.VolumeRef(t.media.pool.name, t.media.volume)
                if t.media.pool is not None
                else t.media.path
            )
            media = domxml.BootMedia(iso=iso)
        return domxml.GuestSpec(
            name=g.name,
            uuid=self.uuid,
            memory_mib=g.memory_mib,
            vcpus=g.vcpus,
            method=t.method,  # type: ignore[arg-type]
            domain_type=self.domain_type or host_domain_type(host=self.host),
            disks=tuple(
                domxml.DiskSpec(domxml.VolumeRef(self.pool.name, volume), target=target)
                for volume, target in zip(
                    [v for v in (self.volume, self.data_volume) if v], ("vda", "vdb"), strict=False
                )
            ),
            nics=self.nics,
            media=media,
            final_boot=t.final_boot,  # type: ignore[arg-type]
            bootloader=t.bootloader_path or None,
            seed=domxml.VolumeRef(self.pool.name, self.seed_volume) if self.seed_volume else None,
            answer_disk=(
                domxml.VolumeRef(self.pool.name, self.answer_volume) if self.answer_volume else None
            ),
            agent=True,
            vnc_listen=self.host.display_address,
            serial_log=str(console_log_path(g.uuid)),
            metadata={
                "request": str(self.request.pk),
                "guest": str(g.pk),
                "template": str(t.pk),
                "template_version": str(self.request.template_version),
            },
        )


_VALIDATED: set[tuple[object, ...]] = set()


def _shape(plan: Plan, phase: str) -> tuple[object, ...]:
    t = plan.template
    return (t.pk, t.version, plan.host.pk, plan.pool.pk, bool(plan.guest.data_disk_mib), phase)


def template_at(template: GuestTemplate, version: int) -> GuestTemplate:
    """The template as it was at `version` (its saved snapshot), or as it is now."""
    if version == template.version:
        return template
    snapshot = TemplateVersion.objects.filter(template=template, version=version).first()
    if snapshot is None:
        return template
    return GuestTemplate(pk=template.pk, version=version, **snapshot.fields)


def plan_of(request: ProvisioningRequest) -> Plan:
    """The plan of a request loaded with its guest, host and template (see `load_request`)."""
    guest = request.guest
    host = request.host
    if guest is None or host is None:
        raise StepFailed("the request has no guest or host")
    template = template_at(request.template, request.template_version)
    pool = template.pool or host.pools.filter(for_guest_disks=True).first()
    if pool is None or pool.host_id != host.pk:
        raise StepFailed(f"no storage pool for guest disks is registered on {host}")
    return Plan(request, guest, host, template, pool)


def load_request(request_id: int) -> ProvisioningRequest:
    """A request with everything its plan reads, and its job (see `transitions.request_job_ref`),
    in one query."""
    jobs = Job.objects.filter(request=OuterRef("pk"), kind__in=Job.FOR_REQUESTS).order_by(
        "-created"
    )
    return (
        ProvisioningRequest.objects.select_related(
            "guest", "host", "template__media__pool", "template__network", "template__pool", "owner"
        )
        .annotate(
            job_pk=Subquery(jobs.values("pk")[:1]), job_status=Subquery(jobs.values("status")[:1])
        )
        .get(pk=request_id)
    )
