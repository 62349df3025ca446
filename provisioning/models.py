"""The portal's data: hosts, registered storage and media, templates, requests, jobs, quotas."""

from __future__ import annotations

import uuid as uuidlib
from pathlib import PurePosixPath

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import F, Q

from provisioning import answers, cloudinit

NAME_VALIDATOR = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
    "Use 1-63 letters, digits, dots, dashes or underscores, starting with a letter or digit.",
)


def _absolute_path(value: str) -> None:
    if value and (not PurePosixPath(value).is_absolute() or ".." in PurePosixPath(value).parts):
        raise ValidationError("Give an absolute path on the host, without '..'.")


class Host(models.Model):
    """A hypervisor the portal places guests on, reached through its libvirt URI."""

    class DomainType(models.TextChoices):
        AUTO = "auto", "Detect (KVM when it really runs guests)"
        KVM = "kvm", "KVM"
        QEMU = "qemu", "Software emulation (QEMU TCG)"

    name = models.CharField(max_length=63, unique=True, validators=[NAME_VALIDATOR])
    uri = models.CharField("libvirt URI", max_length=255, unique=True)
    enabled = models.BooleanField(default=True)
    capacity_vcpus = models.PositiveIntegerField(default=8)
    capacity_memory_mib = models.PositiveIntegerField(default=8192)
    capacity_disk_gib = models.PositiveIntegerField(default=100)
    domain_type = models.CharField(max_length=8, choices=DomainType, default=DomainType.AUTO)
    detected_domain_type = models.CharField(max_length=8, blank=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    migration_address = models.CharField(
        max_length=255,
        blank=True,
        help_text="Address other hosts migrate guests to (tcp://ADDRESS); empty: libvirt picks.",
    )
    answer_base_url = models.URLField(
        blank=True,
        help_text="The portal's address as this host's guests reach it, for answer files "
        "(e.g. http://192.168.150.1:8000); empty: the VMPORTAL_ANSWER_BASE_URL setting. Its "
        "host name must be in ALLOWED_HOSTS.",
    )
    display_address = models.GenericIPAddressField(
        default="127.0.0.1",
        help_text=(
            "Address the guests' VNC displays listen on. 127.0.0.1 keeps them on the host "
            "(the portal reaches them through libvirt when the host is local); give another "
            "address only on a network the portal alone can reach."
        ),
    )
    unmanaged_domains = models.JSONField(
        default=list,
        blank=True,
        help_text="Domains found on the host that the portal did not make.",
    )
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        """The Celery queue whose workers can reach this host's libvirt."""
        return f"hv.{self.name}"


class StoragePool(models.Model):
    """A libvirt storage pool registered by an admin; guest disks are volumes in it."""

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="pools")
    name = models.CharField(max_length=63, validators=[NAME_VALIDATOR])
    path = models.CharField(
        max_length=255,
        validators=[_absolute_path],
        help_text="Folder of a directory pool; the portal creates the pool when it is missing.",
    )
    for_guest_disks = models.BooleanField(default=True)

    class Meta:
        ordering = ["host__name", "name"]
        constraints = [
            models.UniqueConstraint(fields=["host", "name"], name="pool_unique_per_host"),
        ]

    def __str__(self) -> str:
        return f"{self.name}@{self.host}"


class Network(models.Model):
    """A libvirt network or host bridge that guest NICs attach to."""

    class Kind(models.TextChoices):
        NETWORK = "network", "libvirt network"
        BRIDGE = "bridge", "host bridge"

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="networks")
    name = models.CharField(max_length=63, validators=[NAME_VALIDATOR])
    kind = models.CharField(max_length=8, choices=Kind, default=Kind.NETWORK)
    source = models.CharField(
        max_length=63,
        validators=[NAME_VALIDATOR],
        help_text="Name of the libvirt network, or of the bridge on the host.",
    )

    class Meta:
        ordering = ["host__name", "name"]
        constraints = [
            models.UniqueConstraint(fields=["host", "name"], name="network_unique_per_host"),
        ]

    def __str__(self) -> str:
        return f"{self.name}@{self.host}"


class Media(models.Model):
    """Installation media registered by an admin: an ISO image or a kernel + initrd pair."""

    class Kind(models.TextChoices):
        ISO = "iso", "ISO image"
        KERNEL = "kernel", "Kernel + initrd"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=8, choices=Kind)
    description = models.TextField(blank=True)
    pool = models.ForeignKey(
        StoragePool, null=True, blank=True, on_delete=models.PROTECT, related_name="media"
    )
    volume = models.CharField(max_length=255, blank=True, help_text="ISO as a volume of the pool.")
    path = models.CharField(max_length=255, blank=True, validators=[_absolute_path])
    kernel_path = models.CharField(max_length=255, blank=True, validators=[_absolute_path])
    initrd_path = models.CharField(max_length=255, blank=True, validators=[_absolute_path])
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "media"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        by_volume = bool(self.pool_id and self.volume)
        if self.kind == self.Kind.ISO and by_volume == bool(self.path):
            raise ValidationError("An ISO needs either a pool and volume, or a host path.")
        if self.kind == self.Kind.KERNEL and not (self.kernel_path and self.initrd_path):
            raise ValidationError("Kernel media need both a kernel path and an initrd path.")


class GuestTemplate(models.Model):
    """What users may ask for: a provisioning method, its media and the sizes they may pick."""

    class Method(models.TextChoices):
        CDROM = "cdrom", "CD-ROM / ISO install"
        PXE = "pxe", "PXE network install"
        KERNEL = "kernel", "Direct kernel boot install"
        IMPORT = "import", "Import an existing disk"
        CLOUD = "cloud", "Cloud image with cloud-init"

    class Lifecycle(models.TextChoices):
        INSTALL = "install", "Install, then a persistent guest"
        PERSISTENT = "persistent", "Persistent only (define + start)"
        TRANSIENT = "transient", "Transient only (createXML)"

    class AnswerDelivery(models.TextChoices):
        URL = "url", "Fetched from the portal ({answer_url} in the command line)"
        OEMDRV = "oemdrv", "On a CD-ROM labelled OEMDRV, for the install only"

    class FinalBoot(models.TextChoices):
        HD = "hd", "BIOS, boot from disk"
        BOOTLOADER = "bootloader", "Host bootloader"
        KERNEL = "kernel", "The media's kernel and initrd, on every boot"

    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    enabled = models.BooleanField(default=True)
    version = models.PositiveIntegerField(default=1, editable=False)
    method = models.CharField(max_length=8, choices=Method)
    lifecycle = models.CharField(max_length=12, choices=Lifecycle, default=Lifecycle.INSTALL)
    media = models.ForeignKey(
        Media, null=True, blank=True, on_delete=models.PROTECT, related_name="templates"
    )
    network = models.ForeignKey(
        Network, null=True, blank=True, on_delete=models.PROTECT, related_name="templates"
    )
    pool = models.ForeignKey(
        StoragePool,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="templates",
        help_text="Pool for guest disks; the host's first guest-disk pool when empty.",
    )
    base_volume = models.CharField(
        max_length=255,
        blank=True,
        help_text="Import: the volume in the pool to clone. Cloud image: the qcow2 or raw image "
        "each guest's disk is a copy-on-write overlay of.",
    )
    host = models.ForeignKey(
        Host,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="pinned_templates",
        help_text="Pin guests of this template to one host.",
    )
    kernel_cmdline = models.CharField(
        max_length=2048,
        blank=True,
        help_text="Kernel command line of the install boot (direct kernel boot). With an "
        "answer file, {answer_url} in it becomes the file's one-time URL, e.g. "
        "inst.ks={answer_url}.",
    )
    answer_delivery = models.CharField(
        max_length=8,
        choices=AnswerDelivery,
        default=AnswerDelivery.URL,
        help_text="How the installer gets its answer file: from an unguessable one-time URL, "
        "or on a small per-guest CD-ROM labelled OEMDRV (where guests cannot reach the "
        "portal).",
    )
    answer_file = models.TextField(
        blank=True,
        help_text="An answer file for unattended installs (kickstart, preseed, autoinstall "
        "user-data, any text) in the Django template language, rendered once per request. "
        "Context: name, uuid, mac, ssh_keys (a list of authorized_keys lines), vcpus, "
        "memory_mib, disk_mib, password_hash (SHA-512 crypt of a one-time root password). "
        "Tags: if, for, with, comment, spaceless, verbatim, filter, firstof, cycle, now.",
    )
    final_boot = models.CharField(max_length=12, choices=FinalBoot, default=FinalBoot.HD)
    bootloader_path = models.CharField(max_length=255, blank=True, validators=[_absolute_path])
    vcpus_default = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    vcpus_min = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    vcpus_max = models.PositiveIntegerField(default=4, validators=[MaxValueValidator(256)])
    memory_mib_default = models.PositiveIntegerField(default=512)
    memory_mib_min = models.PositiveIntegerField(default=128, validators=[MinValueValidator(16)])
    memory_mib_max = models.PositiveIntegerField(default=4096)
    disk_mib_default = models.PositiveIntegerField(default=1024)
    disk_mib_min = models.PositiveIntegerField(default=64, validators=[MinValueValidator(1)])
    disk_mib_max = models.PositiveIntegerField(default=20480)
    data_disk_mib_default = models.PositiveIntegerField(
        default=0,
        verbose_name="data disk default (MiB)",
        help_text="A second, empty disk (vdb) for the user's data; 0: none unless asked for.",
    )
    data_disk_mib_max = models.PositiveIntegerField(
        default=0,
        verbose_name="data disk max (MiB)",
        help_text="The largest data disk users may ask for; 0: this template offers none. "
        "A rebuild can keep the data disk while the system disk is made anew.",
    )
    start_paused = models.BooleanField(default=False)
    autodestroy = models.BooleanField(default=False)
    autostart = models.BooleanField(default=False)
    install_timeout_minutes = models.PositiveIntegerField(
        default=60, validators=[MinValueValidator(1)]
    )
    cloud_config = models.TextField(
        blank=True,
        help_text="Cloud image: the #cloud-config every guest gets (YAML, checked against "
        "cloud-init's schema); the guest's hostname, instance-id and default user with the "
        "owner's keys are merged in.",
    )
    cloud_user = models.CharField(
        max_length=32,
        default="debian",
        validators=[
            RegexValidator(r"^[a-z_][a-z0-9_-]{0,31}$", "Use a lower-case Unix user name.")
        ],
        help_text="Cloud image: the default user that gets the owner's SSH keys.",
    )
    user_cloud_config = models.BooleanField(
        "owners may add cloud-config",
        default=True,
        help_text="Cloud image: owners may add a cloud-config snippet of their own (64 KiB "
        "at most, checked against the schema).",
    )
    cloud_config_fetches = models.BooleanField(
        "cloud-config may fetch URLs",
        default=False,
        help_text="Allow #include and other parts that make the guest fetch URLs.",
    )
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(vcpus_min__lte=F("vcpus_default"), vcpus_default__lte=F("vcpus_max")),
                name="template_vcpus_in_range",
            ),
            models.CheckConstraint(
                condition=Q(
                    memory_mib_min__lte=F("memory_mib_default"),
                    memory_mib_default__lte=F("memory_mib_max"),
                ),
                name="template_memory_in_range",
            ),
            models.CheckConstraint(
                condition=Q(
                    disk_mib_min__lte=F("disk_mib_default"), disk_mib_default__lte=F("disk_mib_max")
                ),
                name="template_disk_in_range",
            ),
            models.CheckConstraint(
                condition=Q(data_disk_mib_default__lte=F("data_disk_mib_max")),
                name="template_data_disk_in_range",
            ),
            models.CheckConstraint(
                condition=~Q(lifecycle="transient", autostart=True),
                name="template_transient_not_autostart",
            ),
        ]

    # What users pick within the template's ranges; the data disk's minimum is 0 (none).
    SIZES = ("vcpus", "memory_mib", "disk_mib", "data_disk_mib")

    def __str__(self) -> str:
        return f"{self.name} (v{self.version})"

    @property
    def libvirt_summary(self) -> str:
        """What a request of this template does, in one line of libvirt's terms."""
        m, life = self.Method, self.Lifecycle
        boots = {
            self.FinalBoot.HD: "that boots from the disk (boot dev='hd')",
            self.FinalBoot.BOOTLOADER: "booted by the host bootloader",
            self.FinalBoot.KERNEL: "that boots the kernel and initrd",
        }[self.FinalBoot(self.final_boot)]
        if self.lifecycle == life.TRANSIENT:
            then = "createXML only: a transient guest, gone when it stops"
        else:
            then = f"defineXML + create of a persistent config {boots}"
        if self.method == m.IMPORT:
            return f"A copy of volume {self.base_volume}, then {then}."
        if self.method == m.CLOUD:
            return (
                f"A copy-on-write overlay of {self.base_volume} and a NoCloud seed CD-ROM, "
                f"then {then}."
            )
        if self.lifecycle != life.INSTALL:
            if self.method == m.KERNEL and self.final_boot == self.FinalBoot.KERNEL:
                return f"No install: {then} (direct kernel boot)."
            return f"No install: {then}."
        install = {
            m.KERNEL: "a transient install boot of kernel, initrd and cmdline (on_reboot=destroy)",
            m.CDROM: "a transient install boot from the ISO, boot order hd then cdrom",
            m.PXE: "a transient install boot from the network, boot order hd then network",
        }[self.Method(self.method)]
        return f"createXML of {install}; once the installer powers off, {then}."

    def size_range(self, field: str) -> tuple[int, int, int]:
        """(minimum, default, maximum) of one of SIZES."""
        if field == "data_disk_mib":
            return 0, self.data_disk_mib_default, self.data_disk_mib_max
        low, default, high = (getattr(self, f"{field}_{k}") for k in ("min", "default", "max"))
        return int(low), int(default), int(high)

    def size_problem(self, field: str, value: int) -> str | None:
        """Why `value` is not a size users may pick for `field`, or None when it is."""
        low, _default, high = self.size_range(field)
        if field == "data_disk_mib" and value and not high:
            return "This template offers no data disk."
        if low <= value <= high:
            return None
        unit = "" if field == "vcpus" else " MiB"
        least = "0 (none)" if field == "data_disk_mib" else str(low)
        return f"Pick between {least} and {high}{unit}."

    def clean(self) -> None:
        errors: dict[str, str] = {}
        for field in self.SIZES:
            low, default, high = self.size_range(field)
            if not low <= default <= high:
                errors[f"{field}_default"] = "The default must lie between the minimum and maximum."
        needs: dict[str, str] = {
            self.Method.CDROM: Media.Kind.ISO,
            self.Method.KERNEL: Media.Kind.KERNEL,
        }
        wanted = needs.get(self.method)
        if wanted and (self.media is None or self.media.kind != wanted):
            errors["media"] = f"This method needs media of kind '{Media.Kind(wanted).label}'."
        if self.method == self.Method.PXE and self.network is None:
            errors["network"] = "PXE installs need a network."
        if self.method == self.Method.IMPORT and not self.base_volume:
            errors["base_volume"] = "Imports need the base volume to clone."
        if self.method == self.Method.CLOUD:
            if not self.base_volume:
                errors["base_volume"] = "Cloud images need the image (a volume in the pool)."
            if self.media is not None and self.media.kind != Media.Kind.KERNEL:
                errors["media"] = (
                    "A cloud image boots from its disk, or from kernel media (its own kernel "
                    "and initrd) when it has no bootloader."
                )
        if self.cloud_config.strip():
            try:
                cloudinit.parse_cloud_config(
                    self.cloud_config,
                    schema=cloudinit.load_schema(settings.CLOUD_CONFIG_SCHEMA),
                    allow_fetch=self.cloud_config_fetches,
                )
            except cloudinit.CloudConfigError as exc:
                errors["cloud_config"] = str(exc)
        if self.final_boot == self.FinalBoot.BOOTLOADER and not self.bootloader_path:
            errors["bootloader_path"] = "Give the host bootloader's path."
        if self.answer_file.strip():
            try:
                answers.check(self.answer_file)
            except answers.AnswerFileError as exc:
                errors["answer_file"] = str(exc)
        problem = answers.cmdline_problem(
            self.kernel_cmdline,
            answer_file=bool(self.answer_file.strip()),
            url_length=answer_url_length(self.host),
            by_url=self.answer_delivery == self.AnswerDelivery.URL,
        )
        if problem:
            errors["kernel_cmdline"] = problem
        if self.answer_file.strip() and self.lifecycle != self.Lifecycle.INSTALL:
            errors["answer_file"] = "Answer files are for installs: the lifecycle must install."
        if self.final_boot == self.FinalBoot.KERNEL and (
            self.media is None or self.media.kind != Media.Kind.KERNEL
        ):
            errors["final_boot"] = "Booting the kernel on every boot needs kernel media."
        if self.lifecycle == self.Lifecycle.TRANSIENT and self.autostart:
            errors["autostart"] = "Transient guests cannot autostart."
        if self.autodestroy and self.lifecycle != self.Lifecycle.TRANSIENT:
            errors["autodestroy"] = "Only transient guests can be autodestroyed."
        if errors:
            raise ValidationError(errors)


class Guest(models.Model):
    """A libvirt domain the portal made, mirrored from the hypervisor and kept fresh by events."""

    class State(models.TextChoices):
        UNDEFINED = "undefined", "Undefined"
        DEFINED = "defined", "Stopped"
        RUNNING = "running", "Running"
        PAUSED = "paused", "Paused"
        SAVED = "saved", "Saved"

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="guests"
    )
    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="guests")
    template = models.ForeignKey(
        GuestTemplate, null=True, blank=True, on_delete=models.SET_NULL, related_name="guests"
    )
    template_version = models.PositiveIntegerField(null=True, blank=True)
    name = models.CharField(max_length=63, validators=[NAME_VALIDATOR])
    uuid = models.UUIDField(default=uuidlib.uuid4, unique=True)
    mac = models.CharField(max_length=17, blank=True)
    state = models.CharField(max_length=10, choices=State, default=State.UNDEFINED, db_index=True)
    state_reason = models.CharField(max_length=32, blank=True)
    state_changed = models.DateTimeField(null=True, blank=True)
    persistent = models.BooleanField(default=False)
    autostart = models.BooleanField(default=False)
    # Started with VIR_DOMAIN_START_AUTODESTROY: libvirt destroys it when the connection that
    # started it (a worker's) closes, and refuses to save or migrate it.
    autodestroy = models.BooleanField(default=False)
    vcpus = models.PositiveIntegerField(default=1)
    memory_mib = models.PositiveIntegerField(default=512)
    disk_mib = models.PositiveIntegerField(default=0)
    data_disk_mib = models.PositiveIntegerField(default=0, help_text="0: no data disk")
    # Cloud images: the public keys (authorized_keys lines) and the owner's cloud-config chosen
    # when the guest was asked for; a rebuild gives the guest the same again.
    ssh_keys = models.JSONField(default=list, blank=True)
    cloud_config = models.TextField(blank=True)
    # What libvirt last said of the running guest's network: [{ip, prefix, mac, family,
    # source}] with source "lease", "agent" or "arp"; cleared when it stops.
    addresses = models.JSONField(default=list, blank=True)
    addresses_checked = models.DateTimeField(null=True, blank=True)
    agent_connected = models.BooleanField(default=False)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            # libvirt's own rule; a guest that is gone (undefined) frees its name.
            models.UniqueConstraint(
                fields=["host", "name"],
                condition=~Q(state="undefined"),
                name="guest_name_unique_per_host",
            ),
            models.CheckConstraint(condition=Q(vcpus__gte=1), name="guest_has_vcpus"),
        ]
        indexes = [models.Index(fields=["owner", "name"])]

    def __str__(self) -> str:
        return self.name

    @property
    def address_list(self) -> list[str]:
        """The addresses as "ip (source)", IPv4 first."""
        ordered = sorted(self.addresses, key=lambda a: a.get("family") != "ipv4")
        return [f"{a['ip']} ({a['source']})" for a in ordered]


class ProvisioningRequest(models.Model):
    """A user's ask for a guest from a template, and where it stands."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        ADMITTED = "admitted", "Admitted"
        PREPARING = "preparing", "Preparing disk"
        INSTALLING = "installing", "Installing"
        WAITING = "waiting", "Waiting for the installer"
        DEFINING = "defining", "Defining"
        STARTING = "starting", "Starting"
        RUNNING = "running", "Running"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    # The status sets every module reads (the transitions table checks itself against them).
    FINAL = frozenset({Status.RUNNING, Status.FAILED, Status.CANCELLED})

    # Admitted and being built: its guest counts against quotas as if it existed.
    BUILDING = (
        Status.ADMITTED,
        Status.PREPARING,
        Status.INSTALLING,
        Status.WAITING,
        Status.DEFINING,
        Status.STARTING,
    )
    # Not final: the request may still move, fail or be cancelled.
    ACTIVE = (Status.PENDING, *BUILDING)
    # The installer's run: its serial console is followed onto the job's log.
    INSTALLER_RUNS = (Status.INSTALLING, Status.WAITING)

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="provisioning_requests"
    )
    template = models.ForeignKey(GuestTemplate, on_delete=models.PROTECT, related_name="requests")
    template_version = models.PositiveIntegerField()
    name = models.CharField(max_length=63, validators=[NAME_VALIDATOR])
    vcpus = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    memory_mib = models.PositiveIntegerField(validators=[MinValueValidator(16)])
    disk_mib = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    data_disk_mib = models.PositiveIntegerField(default=0, help_text="0: no data disk")
    keep_data_disk = models.BooleanField(
        default=True, help_text="Rebuilds: keep the data disk as it is (else it is made anew)."
    )
    start_paused = models.BooleanField(default=False)
    autostart = models.BooleanField(default=False)
    autodestroy = models.BooleanField(default=False)
    host = models.ForeignKey(
        Host, null=True, blank=True, on_delete=models.PROTECT, related_name="requests"
    )

    class Kind(models.TextChoices):
        NEW = "new", "New guest"
        REBUILD = "rebuild", "Rebuild of an existing guest"

    kind = models.CharField(max_length=8, choices=Kind, default=Kind.NEW)
    guest = models.ForeignKey(
        Guest, null=True, blank=True, on_delete=models.SET_NULL, related_name="requests"
    )
    status = models.CharField(max_length=12, choices=Status, default=Status.PENDING, db_index=True)
    error = models.TextField(blank=True)
    deadline = models.DateTimeField(null=True, blank=True)
    # Set in the commit that fails or cancels the request, cleared once its domain and disks
    # are gone: a clean-up cut short (a worker lost mid-way) is found and run again.
    cleanup_pending = models.BooleanField(default=False)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)
    completed = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.name} ({self.get_status_display()})"

    @property
    def is_final(self) -> bool:
        return self.status in self.FINAL


class Job(models.Model):
    """One unit of work on a guest or request, with its steps and log (the source of progress)."""

    class Kind(models.TextChoices):
        PROVISION = "provision", "Provision"
        START = "start", "Start"
        SHUTDOWN = "shutdown", "Shut down"
        FORCE_OFF = "force_off", "Force off"
        REBOOT = "reboot", "Reboot"
        SUSPEND = "suspend", "Suspend"
        RESUME = "resume", "Resume"
        SAVE = "save", "Save"
        RESTORE = "restore", "Restore"
        MANAGED_SAVE = "managed_save", "Managed save"
        AUTOSTART_ON = "autostart_on", "Autostart on"
        AUTOSTART_OFF = "autostart_off", "Autostart off"
        DELETE = "delete", "Delete"
        REBUILD = "rebuild", "Rebuild"
        MIGRATE = "migrate", "Migrate"
        MAKE_PERSISTENT = "make_persistent", "Make persistent"
        SNAPSHOT = "snapshot", "Take a snapshot"
        REVERT = "revert", "Revert to a snapshot"
        SNAPSHOT_DELETE = "snapshot_delete", "Delete a snapshot"

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    ACTIVE = (Status.QUEUED, Status.RUNNING)
    FINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})
    # The jobs a provisioning request runs under: its steps move them, not run_job.
    FOR_REQUESTS = (Kind.PROVISION, Kind.REBUILD)

    kind = models.CharField(max_length=16, choices=Kind)
    status = models.CharField(max_length=10, choices=Status, default=Status.QUEUED, db_index=True)
    guest = models.ForeignKey(
        Guest, null=True, blank=True, on_delete=models.CASCADE, related_name="jobs"
    )
    request = models.ForeignKey(
        ProvisioningRequest, null=True, blank=True, on_delete=models.CASCADE, related_name="jobs"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    progress = models.PositiveSmallIntegerField(default=0, validators=[MaxValueValidator(100)])
    error = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    completed = models.DateTimeField(null=True, blank=True)
    deadline = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]
        constraints = [
            # One mutating job per guest at a time; a second one is refused by the database itself.
            models.UniqueConstraint(
                fields=["guest"],
                condition=Q(status__in=["queued", "running"]),
                name="one_active_job_per_guest",
            ),
            models.CheckConstraint(condition=Q(progress__lte=100), name="job_progress_percent"),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} #{self.pk} ({self.get_status_display()})"


class JobEvent(models.Model):
    """An append-only line in a job's history: a step, a state change or a log line."""

    class Kind(models.TextChoices):
        STEP = "step", "Step"
        LOG = "log", "Log"
        STATE = "state", "State change"
        CONSOLE = "console", "Console"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    created = models.DateTimeField(auto_now_add=True)
    kind = models.CharField(max_length=8, choices=Kind, default=Kind.LOG)
    message = models.TextField()
    progress = models.PositiveSmallIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["created", "id"]

    def __str__(self) -> str:
        return self.message[:60]


class Quota(models.Model):
    """Limits on what a user, or a group with all its members together, may hold at once."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="quota",
    )
    group = models.OneToOneField(
        Group, null=True, blank=True, on_delete=models.CASCADE, related_name="quota"
    )
    max_guests = models.PositiveIntegerField(default=5)
    max_vcpus = models.PositiveIntegerField(default=8)
    max_memory_mib = models.PositiveIntegerField(default=8192)
    max_disk_mib = models.PositiveIntegerField(default=102400)
    max_snapshots_per_guest = models.PositiveIntegerField(
        default=5, help_text="Snapshots each of the guests may hold at once."
    )

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(Q(user__isnull=False) & Q(group__isnull=True))
                | (Q(user__isnull=True) & Q(group__isnull=False)),
                name="quota_for_user_xor_group",
            ),
        ]

    def __str__(self) -> str:
        return f"Quota for {self.user or self.group}"

    def clean(self) -> None:
        if bool(self.user_id) == bool(self.group_id):
            raise ValidationError("A quota belongs to exactly one user or one group.")


class RequestEvent(models.Model):
    """An append-only line in a request's history: one status change and why it happened."""

    request = models.ForeignKey(
        ProvisioningRequest, on_delete=models.CASCADE, related_name="events"
    )
    created = models.DateTimeField(auto_now_add=True)
    from_status = models.CharField(max_length=12, choices=ProvisioningRequest.Status)
    to_status = models.CharField(max_length=12, choices=ProvisioningRequest.Status)
    note = models.TextField(blank=True)

    class Meta:
        ordering = ["created", "id"]

    def __str__(self) -> str:
        return f"{self.from_status} → {self.to_status}"


class TemplateVersion(models.Model):
    """What a template said at one version, so a guest can be rebuilt from the version it has."""

    template = models.ForeignKey(GuestTemplate, on_delete=models.CASCADE, related_name="versions")
    version = models.PositiveIntegerField()
    fields = models.JSONField()
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["template", "-version"]
        constraints = [
            models.UniqueConstraint(fields=["template", "version"], name="template_version_once"),
        ]

    def __str__(self) -> str:
        return f"{self.template.name} v{self.version}"


class RebuildSchedule(models.Model):
    """A guest rebuilt from its template, or snapshotted, on a schedule (a django-celery-beat
    periodic task)."""

    class Source(models.TextChoices):
        LATEST = "latest", "The template's latest version"
        PINNED = "pinned", "The version the guest has"

    class Action(models.TextChoices):
        REBUILD = "rebuild", "Rebuild"
        SNAPSHOT = "snapshot", "Snapshot"

    guest = models.ForeignKey(Guest, on_delete=models.CASCADE, related_name="schedules")
    action = models.CharField(max_length=8, choices=Action, default=Action.REBUILD)
    keep = models.PositiveSmallIntegerField(
        default=0,
        help_text="Snapshots: how many of this schedule's to keep; the oldest beyond goes "
        "once a new one is taken.",
    )
    periodic_task = models.OneToOneField(
        "django_celery_beat.PeriodicTask", on_delete=models.CASCADE, related_name="rebuild"
    )
    source = models.CharField(max_length=8, choices=Source, default=Source.LATEST)
    keep_data_disk = models.BooleanField(
        default=True, help_text="Keep the guest's data disk; else each rebuild starts it empty."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["guest__name", "id"]

    def __str__(self) -> str:
        return f"{self.get_action_display()} {self.guest} ({self.periodic_task.name})"


class ScheduleRun(models.Model):
    """One firing of a rebuild schedule: skipped (guest busy), or the rebuild job it started."""

    class Outcome(models.TextChoices):
        FIRED = "fired", "Fired"
        SKIPPED = "skipped", "Skipped"
        FAILED = "failed", "Could not start"

    schedule = models.ForeignKey(RebuildSchedule, on_delete=models.CASCADE, related_name="runs")
    fired = models.DateTimeField(auto_now_add=True)
    outcome = models.CharField(max_length=8, choices=Outcome, default=Outcome.FIRED)
    job = models.ForeignKey(
        Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="schedule_runs"
    )
    message = models.TextField(blank=True)

    class Meta:
        ordering = ["-fired", "-id"]

    def __str__(self) -> str:
        return f"{self.schedule} at {self.fired:%Y-%m-%d %H:%M}: {self.outcome}"

    @property
    def result(self) -> str:
        """fired, skipped, succeeded or failed: a fired run ends as its job does."""
        if self.outcome == self.Outcome.FIRED and self.job is not None:
            return {"succeeded": "succeeded", "failed": "failed", "cancelled": "failed"}.get(
                self.job.status, "running"
            )
        return str(self.outcome)

    @property
    def duration(self) -> float | None:
        """Seconds the rebuild took, once it ended."""
        if self.job is None or self.job.started is None or self.job.completed is None:
            return None
        return (self.job.completed - self.job.started).total_seconds()


class SshKey(models.Model):
    """A public key a user keeps in their profile, to put on the guests they ask for."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="ssh_keys"
    )
    name = models.CharField(max_length=100)
    public_key = models.TextField(help_text="One authorized_keys line: type, key, comment.")
    fingerprint = models.CharField(max_length=100, help_text="SHA256, as ssh-keygen -l shows.")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="ssh_key_name_unique"),
            models.UniqueConstraint(
                fields=["owner", "fingerprint"], name="ssh_key_fingerprint_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.fingerprint})"


# The longest snapshot name kept (libvirt sets no limit; longer ones are not adopted).
SNAPSHOT_NAME_MAX = 255


class Snapshot(models.Model):
    """An internal snapshot of a guest, as libvirt has it (libvirt is the truth: rows follow it).

    Taken, reverted to and deleted by jobs; the rows are made again from libvirt's list after
    each such job and by reconcile, so one made or deleted outside the portal is adopted or
    forgotten.
    """

    guest = models.ForeignKey(Guest, on_delete=models.CASCADE, related_name="snapshots")
    # The portal names its own within services.snapshots.NAME (50 characters); one made outside
    # it (virsh) is adopted with its name as it is, up to SNAPSHOT_NAME_MAX.
    name = models.CharField(max_length=SNAPSHOT_NAME_MAX)
    description = models.CharField(max_length=200, blank=True)
    taken = models.DateTimeField()
    # The guest's state when taken (libvirt's word: running, paused, shutoff, ...).
    state = models.CharField(max_length=16)
    memory = models.BooleanField(default=False, help_text="Holds the guest's memory too.")
    current = models.BooleanField(default=False, help_text="The one the guest last came from.")
    parent = models.CharField(max_length=SNAPSHOT_NAME_MAX, blank=True)
    # What the disks grew by when it was taken (internal snapshots share the disk files); None
    # for one the portal did not take.
    size_bytes = models.BigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["guest", "taken", "name"]
        constraints = [
            models.UniqueConstraint(fields=["guest", "name"], name="snapshot_unique_per_guest"),
        ]

    def __str__(self) -> str:
        return f"{self.name} of {self.guest}"


class ConsoleSession(models.Model):
    """A console a user opened on a guest, from the one-time token the page minted to its end.

    A row starts as a token (``opened`` empty) that expires after seconds; opening the console
    uses the token up. Rows with ``opened`` set are the guest's console history.
    """

    class Kind(models.TextChoices):
        SERIAL = "serial", "Serial terminal"
        GRAPHICS = "graphics", "Graphical console"

    guest = models.ForeignKey(Guest, on_delete=models.CASCADE, related_name="console_sessions")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="console_sessions"
    )
    kind = models.CharField(max_length=8, choices=Kind)
    token_hash = models.CharField(max_length=64, unique=True, help_text="SHA-256 of the token.")
    created = models.DateTimeField(auto_now_add=True)
    expires = models.DateTimeField()
    opened = models.DateTimeField(null=True, blank=True)
    closed = models.DateTimeField(null=True, blank=True)
    close_reason = models.CharField(max_length=123, blank=True)
    client = models.CharField(max_length=64, blank=True, help_text="The browser's address.")

    class Meta:
        ordering = ["-created"]
        indexes = [models.Index(fields=["guest", "opened"])]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} of {self.guest} by {self.user}"

    @property
    def duration(self) -> float | None:
        """Seconds the session lasted, once it ended."""
        if self.opened is None or self.closed is None:
            return None
        return (self.closed - self.opened).total_seconds()


def answer_base(host: Host | None) -> str:
    """The portal's address as guests of `host` reach it ("" when none is set)."""
    base = (host.answer_base_url if host is not None else "") or settings.ANSWER_BASE_URL
    return str(base).rstrip("/")


def answer_url(host: Host | None, token: str) -> str:
    """Where an installer on `host` fetches the answer file of `token`."""
    return f"{answer_base(host)}/install/{token}/"


def answer_url_length(host: Host | None) -> int:
    """The length of an answer file's URL for guests of `host` (for command-line limits)."""
    return len(answer_url(host, "x" * ANSWER_TOKEN_CHARS))


ANSWER_TOKEN_CHARS = 43  # secrets.token_urlsafe(32)


class AnswerFile(models.Model):
    """One request's rendered answer file, served once at /install/<token>/ while it installs."""

    request = models.OneToOneField(
        ProvisioningRequest, on_delete=models.CASCADE, related_name="answer"
    )
    token = models.CharField(max_length=64, unique=True)
    content = models.TextField()
    created = models.DateTimeField(auto_now_add=True)
    expires = models.DateTimeField()
    fetched = models.DateTimeField(null=True, blank=True)
    fetched_from = models.CharField(max_length=64, blank=True)

    def __str__(self) -> str:
        return f"answer file of request #{self.request_id}"


class ApiToken(models.Model):
    """A personal API token: shown once, kept as its SHA-256, scoped, expiring and revocable."""

    class Scope(models.TextChoices):
        READ = "read", "Read only"
        WRITE = "write", "Read and write"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, help_text="The token's first characters, to tell it.")
    digest = models.CharField(max_length=64, unique=True, help_text="SHA-256 of the token.")
    scope = models.CharField(max_length=5, choices=Scope, default=Scope.READ)
    created = models.DateTimeField(auto_now_add=True)
    expires = models.DateTimeField()
    revoked = models.DateTimeField(null=True, blank=True)
    last_used = models.DateTimeField(null=True, blank=True)
    last_used_from = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["-created"]
        constraints = [
            models.UniqueConstraint(
                fields=["user", "name"], condition=Q(revoked__isnull=True), name="api_token_name"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def writes(self) -> bool:
        return self.scope == self.Scope.WRITE


class IdempotencyKey(models.Model):
    """A POST's Idempotency-Key: a retry with the same key answers what the first made."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64, help_text="SHA-256 of the request's body.")
    request = models.ForeignKey(
        ProvisioningRequest, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "key"], name="idempotency_key_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.key} of {self.user_id}"


class AuditEvent(models.Model):
    """One state-changing action, login or refusal: who, through what, on what, and the result.

    Rows are only ever added (and pruned after the retention period); nothing edits them.
    """

    class Channel(models.TextChoices):
        WEB = "web", "Web pages"
        API = "api", "API"
        ADMIN = "admin", "Admin"
        SCHEDULE = "schedule", "Schedule"
        RECONCILE = "reconcile", "Reconcile"
        LISTENER = "listener", "Event listener"
        WORKER = "worker", "Worker"
        SYSTEM = "system", "System"

    class Result(models.TextChoices):
        OK = "ok", "Done"
        REFUSED = "refused", "Refused"
        FAILED = "failed", "Failed"

    created = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        db_constraint=False,
    )
    actor_name = models.CharField(max_length=150, blank=True)
    channel = models.CharField(max_length=10, choices=Channel, db_index=True)
    token = models.ForeignKey(
        ApiToken,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        db_constraint=False,
    )
    token_name = models.CharField(max_length=100, blank=True)
    source_ip = models.GenericIPAddressField(null=True, blank=True)
    action = models.CharField(max_length=40, db_index=True)
    object_type = models.CharField(max_length=40, blank=True)
    object_id = models.CharField(max_length=64, blank=True)
    object_repr = models.CharField(max_length=200, blank=True)
    changes = models.JSONField(default=dict, blank=True, help_text="{field: [before, after]}")
    result = models.CharField(max_length=8, choices=Result, default=Result.OK)
    detail = models.TextField(blank=True)

    class Meta:
        ordering = ["-created", "-id"]
        indexes = [models.Index(fields=["object_type", "object_id"])]

    def __str__(self) -> str:
        return f"{self.action} by {self.actor_name or self.channel} ({self.result})"
