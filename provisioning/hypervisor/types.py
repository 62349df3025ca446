"""Plain values the hypervisor layer hands out: guest states, domain, volume and host facts."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import libvirt


class GuestState(enum.StrEnum):
    """The portal's five guest states, folded from libvirt's (state, reason) pairs."""

    UNDEFINED = "undefined"
    DEFINED = "defined"
    RUNNING = "running"
    PAUSED = "paused"
    SAVED = "saved"


def constant_names(prefix: str, names: tuple[str, ...]) -> dict[int, str]:
    """Map libvirt constants prefix+NAME to 'name', skipping ones this libvirt-python lacks."""
    table: dict[int, str] = {}
    for name in names:
        value = getattr(libvirt, prefix + name, None)
        if isinstance(value, int):
            table[value] = name.lower()
    return table


# Listed by hand: a prefix scan would also catch flags that share it (VIR_DOMAIN_SHUTDOWN_*).
LIBVIRT_STATE_NAMES: dict[int, str] = constant_names(
    "VIR_DOMAIN_",
    ("NOSTATE", "RUNNING", "BLOCKED", "PAUSED", "SHUTDOWN", "SHUTOFF", "CRASHED", "PMSUSPENDED"),
)

_REASONS: dict[int, dict[int, str]] = {
    libvirt.VIR_DOMAIN_NOSTATE: constant_names("VIR_DOMAIN_NOSTATE_", ("UNKNOWN",)),
    libvirt.VIR_DOMAIN_RUNNING: constant_names(
        "VIR_DOMAIN_RUNNING_",
        (
            "UNKNOWN",
            "BOOTED",
            "MIGRATED",
            "RESTORED",
            "FROM_SNAPSHOT",
            "UNPAUSED",
            "MIGRATION_CANCELED",
            "SAVE_CANCELED",
            "WAKEUP",
            "CRASHED",
            "POSTCOPY",
            "POSTCOPY_FAILED",
        ),
    ),
    libvirt.VIR_DOMAIN_BLOCKED: constant_names("VIR_DOMAIN_BLOCKED_", ("UNKNOWN",)),
    libvirt.VIR_DOMAIN_PAUSED: constant_names(
        "VIR_DOMAIN_PAUSED_",
        (
            "UNKNOWN",
            "USER",
            "MIGRATION",
            "SAVE",
            "DUMP",
            "IOERROR",
            "WATCHDOG",
            "FROM_SNAPSHOT",
            "SHUTTING_DOWN",
            "SNAPSHOT",
            "CRASHED",
            "STARTING_UP",
            "POSTCOPY",
            "POSTCOPY_FAILED",
            "API_ERROR",
        ),
    ),
    libvirt.VIR_DOMAIN_SHUTDOWN: constant_names("VIR_DOMAIN_SHUTDOWN_", ("UNKNOWN", "USER")),
    libvirt.VIR_DOMAIN_SHUTOFF: constant_names(
        "VIR_DOMAIN_SHUTOFF_",
        (
            "UNKNOWN",
            "SHUTDOWN",
            "DESTROYED",
            "CRASHED",
            "MIGRATED",
            "SAVED",
            "FAILED",
            "FROM_SNAPSHOT",
            "DAEMON",
        ),
    ),
    libvirt.VIR_DOMAIN_CRASHED: constant_names("VIR_DOMAIN_CRASHED_", ("UNKNOWN", "PANICKED")),
    libvirt.VIR_DOMAIN_PMSUSPENDED: constant_names("VIR_DOMAIN_PMSUSPENDED_", ("UNKNOWN",)),
}


def state_name(state: int) -> str:
    """libvirt's name for a raw domain state ('shutoff', 'running', ...)."""
    return LIBVIRT_STATE_NAMES.get(state, f"state-{state}")


def reason_name(state: int, reason: int) -> str:
    """Readable reason for a raw (state, reason) pair ('shutdown', 'destroyed', 'booted', ...)."""
    return _REASONS.get(state, {}).get(reason, "unknown")


def guest_state(state: int, reason: int, *, has_managed_save: bool) -> GuestState:
    """Fold libvirt's state and reason into the portal's five states.

    SHUTOFF counts as SAVED with a managed-save image or with reason SAVED (saved to a file).
    libvirt keeps reason SAVED after the managed-save image is removed, until the next start,
    so check ``has_managed_save`` to know whether a start will resume.
    """
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return GuestState.RUNNING
    # A guest being shut down is still running until it reaches SHUTOFF.
    if state == libvirt.VIR_DOMAIN_SHUTDOWN:
        return GuestState.RUNNING
    if state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
        return GuestState.PAUSED
    if state == libvirt.VIR_DOMAIN_SHUTOFF and (
        has_managed_save or reason == libvirt.VIR_DOMAIN_SHUTOFF_SAVED
    ):
        return GuestState.SAVED
    return GuestState.DEFINED


@dataclass(frozen=True)
class DomainInfo:
    """What libvirt knows about one guest at one moment."""

    uuid: str
    name: str
    state: GuestState
    reason: str
    libvirt_state: str
    persistent: bool
    autostart: bool
    has_managed_save: bool
    id: int | None
    vcpus: int
    memory_kib: int

    @classmethod
    def undefined(cls, uuid: str) -> DomainInfo:
        """The answer for a guest libvirt does not know (never defined, or gone)."""
        return cls(
            uuid=uuid,
            name="",
            state=GuestState.UNDEFINED,
            reason="not-found",
            libvirt_state="none",
            persistent=False,
            autostart=False,
            has_managed_save=False,
            id=None,
            vcpus=0,
            memory_kib=0,
        )

    @property
    def exists(self) -> bool:
        """True unless libvirt does not know the guest."""
        return self.state is not GuestState.UNDEFINED

    @property
    def active(self) -> bool:
        """True while a guest process exists (running or paused)."""
        return self.state in (GuestState.RUNNING, GuestState.PAUSED)


@dataclass(frozen=True)
class VolumeInfo:
    """One storage volume; the path is for libvirt's eyes, never asked from users."""

    pool: str
    name: str
    capacity: int
    allocation: int
    format: str
    path: str


@dataclass(frozen=True)
class PoolInfo:
    """One storage pool."""

    name: str
    uuid: str
    type: str
    path: str
    active: bool
    autostart: bool
    persistent: bool
    capacity: int
    allocation: int
    available: int


@dataclass(frozen=True)
class HostInfo:
    """A hypervisor host: versions, identity and size."""

    uri: str
    hostname: str
    driver: str
    lib_version: str
    hypervisor_version: str
    arch: str
    cpus: int
    memory_kib: int

    def as_dict(self) -> dict[str, str | int]:
        """Plain dict for JSON (health pages, logs)."""
        return {
            "uri": self.uri,
            "hostname": self.hostname,
            "driver": self.driver,
            "lib_version": self.lib_version,
            "hypervisor_version": self.hypervisor_version,
            "arch": self.arch,
            "cpus": self.cpus,
            "memory_kib": self.memory_kib,
        }


def format_version(number: int) -> str:
    """libvirt's packed version number (major*1e6 + minor*1e3 + micro) as 'major.minor.micro'."""
    major, rest = divmod(number, 1_000_000)
    minor, micro = divmod(rest, 1_000)
    return f"{major}.{minor}.{micro}"


@dataclass(frozen=True)
class GuestAddress:
    """One address of a guest's NIC, and where libvirt learnt it: "lease" (the libvirt network's
    DHCP server), "agent" (the guest agent) or "arp" (the host's neighbour table)."""

    ip: str
    prefix: int
    mac: str
    family: str  # "ipv4" or "ipv6"
    source: str


@dataclass(frozen=True)
class NetworkView:
    """What one look at a guest finds: its addresses, whether its agent is connected, and how
    many NICs its live config has (none: no address will ever show)."""

    addresses: tuple[GuestAddress, ...] = ()
    agent_connected: bool = False
    nics: int = 0
