"""Every provisioning method, installing and booting the tiny guest on real QEMU via libvirt.

The installer (kernel, ISO or PXE) writes a bootable disk with a marker and powers off; the
installed system prints ``VMPORTAL-DISK: <marker>`` and ``VMPORTAL-READY`` on its serial port,
which libvirt logs to a file. Seeing the marker after a boot from disk proves which install
wrote that disk.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from provisioning.demo import tinyguest
from provisioning.hypervisor import (
    DomainInfo,
    GuestState,
    Hypervisor,
    LifecycleEvent,
    create_transient,
    define,
    destroy,
    get_info,
    get_xml,
    start,
)
from provisioning.hypervisor import storage as hv_storage
from provisioning.hypervisor.domxml import (
    BootMedia,
    DiskSpec,
    GuestSpec,
    Method,
    NicSpec,
    VolumeRef,
    final_xml,
    install_xml,
    random_mac,
)
from tests.support.libvirt import QEMU_URI
from tests.support.qemu import (
    DEMO_CACHE,
    DOMAIN_TYPE,
    MIB,
    POOL_PARENT,
    STAGE_PARENT,
    EventLog,
    StagedMedia,
    Tracker,
    create_network,
    dhcp_leases,
    free_subnet,
    isolated_pxe_network_xml,
    listening,
    network_xml,
    read_console,
    stage_media,
    unique,
    wait_for_console,
)

pytestmark = pytest.mark.qemu

MEMORY_MIB = max(tinyguest.MEMORY_MIN_MIB, 192)
# Deadlines under TCG on 2 cores; each phase normally takes 5-20 s.
INSTALL_TIMEOUT = 120.0
BOOT_TIMEOUT = 90.0
ISO_VOLUME = "tinyguest.iso"


@dataclass(frozen=True)
class Lab:
    """The module's connection, staged media, pool (with the ISO registered) and event log."""

    hv: Hypervisor
    media: StagedMedia
    pool: str
    iso: VolumeRef
    events: EventLog


@dataclass(frozen=True)
class InstallRun:
    """What was seen while a two-phase install ran, virt-install style."""

    spec: GuestSpec
    disk: VolumeRef
    started: DomainInfo  # right after createXML(install config)
    defined: DomainInfo  # right after defineXML(final config), installer still running
    live_xml: str  # the installer's running config
    next_boot_xml: str  # the persistent config, read while the installer ran
    stopped: LifecycleEvent
    after: DomainInfo
    console: str  # the installer's serial log


@pytest.fixture(scope="session")
def tiny_guest() -> tinyguest.TinyGuest:
    return tinyguest.build(DEMO_CACHE)


@pytest.fixture(scope="module")
def lab(tiny_guest: tinyguest.TinyGuest) -> Iterator[Lab]:
    hv = Hypervisor(QEMU_URI)
    tracker = Tracker(hv)
    try:
        media = stage_media(tiny_guest, tracker.folder(STAGE_PARENT / unique("media")))
        pool = unique("pool")
        path = POOL_PARENT / pool
        hv_storage.ensure_dir_pool(hv, tracker.pool(pool, path), str(path))
        hv_storage.upload_file(hv, pool, ISO_VOLUME, media.iso)
        with listening(QEMU_URI) as events:
            yield Lab(hv, media, pool, VolumeRef(pool, ISO_VOLUME), events)
    finally:
        try:
            tracker.close()
        finally:
            hv.close()


@pytest.fixture
def tracker(lab: Lab) -> Iterator[Tracker]:
    """Cleans up what one test made, also when it failed."""
    made = Tracker(lab.hv)
    yield made
    made.close()


# --------------------------------------------------------------------------- helpers


def new_disk(lab: Lab, tracker: Tracker, label: str) -> VolumeRef:
    """A blank qcow2 volume just big enough for the tiny guest."""
    name = f"{unique(label)}.qcow2"
    hv_storage.create_volume(lab.hv, lab.pool, name, tinyguest.DISK_MIN_MIB * MIB)
    return VolumeRef(lab.pool, tracker.volume(lab.pool, name))


def copy_installed_disk(lab: Lab, tracker: Tracker, run: InstallRun, label: str) -> VolumeRef:
    """A full copy of an install's volume, taken while no guest uses it."""
    destroy(lab.hv, run.spec.uuid)  # idempotent; a copy of a disk in use could be torn
    name = f"{unique(label)}.qcow2"
    hv_storage.clone_volume(lab.hv, run.disk.pool, run.disk.volume, name)
    return VolumeRef(run.disk.pool, tracker.volume(run.disk.pool, name))


def guest_spec(
    lab: Lab,
    tracker: Tracker,
    method: Method,
    disk: VolumeRef,
    *,
    media: BootMedia | None = None,
    nics: tuple[NicSpec, ...] = (),
) -> GuestSpec:
    """A one-vCPU tiny guest on disk, its serial console logged to a file of its own."""
    name = unique(method)
    spec = GuestSpec(
        name=name,
        uuid=str(uuid.uuid4()),
        memory_mib=MEMORY_MIB,
        vcpus=1,
        method=method,
        domain_type=DOMAIN_TYPE,
        disks=(DiskSpec(source=disk),),
        nics=nics,
        media=media or BootMedia(),
        serial_log=str(lab.media.logs / f"{name}.log"),
        vnc=False,
        metadata={"test": name},
    )
    tracker.domain(spec.uuid)
    return spec


def console_path(spec: GuestSpec) -> Path:
    assert spec.serial_log is not None
    return Path(spec.serial_log)


def install(lab: Lab, spec: GuestSpec) -> InstallRun:
    """createXML(install config), defineXML(final config) at once, wait for the poweroff."""
    since = lab.events.mark()
    started = create_transient(lab.hv, install_xml(spec))
    # From this moment the final config is libvirt's, so a crash of ours loses nothing.
    defined = define(lab.hv, final_xml(spec))
    live_xml = get_xml(lab.hv, spec.uuid)
    next_boot_xml = get_xml(lab.hv, spec.uuid, inactive=True)
    stopped = lab.events.wait(spec.uuid, "stopped", timeout=INSTALL_TIMEOUT, since=since)
    return InstallRun(
        spec=spec,
        disk=spec.disks[0].source,
        started=started,
        defined=defined,
        live_xml=live_xml,
        next_boot_xml=next_boot_xml,
        stopped=stopped,
        after=get_info(lab.hv, spec.uuid),
        console=read_console(console_path(spec)),
    )


def boot_disk_and_read_marker(lab: Lab, spec: GuestSpec) -> tinyguest.ConsoleReport:
    """Start the defined guest and wait until the installed system reports its disk."""
    info = start(lab.hv, spec.uuid)
    assert info.state is GuestState.RUNNING
    return wait_for_ready(spec)


def wait_for_ready(spec: GuestSpec) -> tinyguest.ConsoleReport:
    return wait_for_console(
        console_path(spec),
        lambda report: report.ready,
        timeout=BOOT_TIMEOUT,
        what="VMPORTAL-READY from the installed disk",
    )


def xml_root(xml: str) -> etree._Element:
    return etree.fromstring(xml.encode())


def boot_order(xml: str) -> list[str]:
    return [boot.get("dev", "") for boot in xml_root(xml).iterfind("os/boot")]


def has_kernel(xml: str) -> bool:
    return xml_root(xml).find("os/kernel") is not None


def cdrom_sources(xml: str) -> list[tuple[str | None, str | None]]:
    """(pool, volume) of every CD-ROM drive."""
    return [
        (source.get("pool"), source.get("volume"))
        for source in xml_root(xml).iterfind("devices/disk[@device='cdrom']/source")
    ]


def assert_installer_powered_itself_off(run: InstallRun, marker: str) -> None:
    """The shared end of every install: guest poweroff, final config kept, marker written."""
    assert run.stopped.detail == "shutdown"  # the guest powered off; nobody destroyed it
    assert run.after.state is GuestState.DEFINED
    assert run.after.reason == "shutdown"
    assert run.after.persistent
    assert tinyguest.parse_console(run.console).installed_marker == marker


# --------------------------------------------------------------------------- shared installs


@pytest.fixture(scope="module")
def kernel_install(lab: Lab) -> Iterator[InstallRun]:
    """The tiny guest installed by direct kernel boot (shared: tests 1, 4 and 5 read its disk)."""
    module_tracker = Tracker(lab.hv)
    try:
        disk = new_disk(lab, module_tracker, "kernel")
        marker = f"kernel-{secrets.token_hex(3)}"
        media = BootMedia(
            kernel=str(lab.media.kernel),
            initrd=str(lab.media.initrd),
            cmdline=tinyguest.install_cmdline(marker),
        )
        spec = guest_spec(lab, module_tracker, "kernel", disk, media=media)
        yield install(lab, spec)
    finally:
        module_tracker.close()


@dataclass(frozen=True)
class PxeSetup:
    """An isolated TFTP/BOOTP network and the guest installed from it."""

    network: str
    network_xml: str
    run: InstallRun


@pytest.fixture(scope="module")
def pxe_install(lab: Lab) -> Iterator[PxeSetup]:
    """A throwaway isolated network serving pxelinux, and a guest installed over PXE from it."""
    module_tracker = Tracker(lab.hv)
    try:
        network = unique("net")
        bridge = "vmpqt" + network[-6:]
        xml = isolated_pxe_network_xml(
            name=network,
            bridge=bridge,
            subnet=free_subnet(lab.hv),
            tftp_root=lab.media.pxe_root,
            boot_file="pxelinux.0",
        )
        create_network(lab.hv, xml)
        module_tracker.network(network)
        disk = new_disk(lab, module_tracker, "pxe")
        nic = NicSpec(mac=random_mac(), network=network)
        spec = guest_spec(lab, module_tracker, "pxe", disk, nics=(nic,))
        yield PxeSetup(network, network_xml(lab.hv, network), install(lab, spec))
    finally:
        module_tracker.close()


# --------------------------------------------------------------------------- the tests


def test_it_installs_by_direct_kernel_boot_and_then_boots_the_disk(
    lab: Lab, kernel_install: InstallRun
) -> None:
    run = kernel_install
    marker = tinyguest.parse_console(run.console).installed_marker
    assert marker is not None and marker.startswith("kernel-")

    # Phase 1: a transient installer, made persistent at once with the final config.
    assert not run.started.persistent
    assert run.started.state is GuestState.RUNNING
    assert run.defined.persistent
    assert run.defined.state is GuestState.RUNNING  # the installer kept running
    assert has_kernel(run.live_xml)
    cmdline = xml_root(run.live_xml).findtext("os/cmdline")
    assert cmdline == tinyguest.install_cmdline(marker)
    assert not has_kernel(run.next_boot_xml)
    assert boot_order(run.next_boot_xml) == ["hd"]
    assert run.stopped.uuid == run.spec.uuid
    assert_installer_powered_itself_off(run, marker)

    # Phase 2: the persistent config boots the disk the installer wrote.
    try:
        report = boot_disk_and_read_marker(lab, run.spec)
        assert report.disk_marker == marker
        live = get_xml(lab.hv, run.spec.uuid)
        assert not has_kernel(live)
        assert boot_order(live) == ["hd"]
    finally:
        destroy(lab.hv, run.spec.uuid)


def test_it_installs_from_an_iso_and_boots_the_disk_without_the_cdrom(
    lab: Lab, tracker: Tracker
) -> None:
    disk = new_disk(lab, tracker, "cdrom")
    spec = guest_spec(lab, tracker, "cdrom", disk, media=BootMedia(iso=lab.iso))
    run = install(lab, spec)

    # The blank disk comes first and fails, so the BIOS falls through to the CD.
    assert boot_order(run.live_xml) == ["hd", "cdrom"]
    assert cdrom_sources(run.live_xml) == [(lab.pool, ISO_VOLUME)]
    assert boot_order(run.next_boot_xml) == ["hd"]
    assert cdrom_sources(run.next_boot_xml) == []
    assert_installer_powered_itself_off(run, "cdrom")

    report = boot_disk_and_read_marker(lab, spec)
    assert report.disk_marker == "cdrom"
    live = get_xml(lab.hv, spec.uuid)
    assert cdrom_sources(live) == []
    assert boot_order(live) == ["hd"]


def test_it_installs_over_pxe_from_an_isolated_network_and_boots_the_disk(
    lab: Lab, pxe_install: PxeSetup
) -> None:
    run = pxe_install.run
    net = xml_root(pxe_install.network_xml)
    assert net.find("forward") is None  # isolated: the guest network routes nowhere
    assert net.find("ip/tftp") is not None
    assert [bootp.get("file") for bootp in net.iterfind("ip/dhcp/bootp")] == ["pxelinux.0"]

    assert boot_order(run.live_xml) == ["hd", "network"]
    assert boot_order(run.next_boot_xml) == ["hd"]
    assert_installer_powered_itself_off(run, "pxe")
    # The guest's NIC got its address (and so its boot file) from our network's dnsmasq.
    mac = run.spec.nics[0].mac
    assert mac in {lease["mac"] for lease in dhcp_leases(lab.hv, pxe_install.network)}

    try:
        report = boot_disk_and_read_marker(lab, run.spec)
        assert report.disk_marker == "pxe"
    finally:
        destroy(lab.hv, run.spec.uuid)


def test_it_boots_the_installed_disk_when_the_pxe_install_config_runs_again(
    lab: Lab, pxe_install: PxeSetup
) -> None:
    spec = pxe_install.run.spec
    assert get_info(lab.hv, spec.uuid).state is GuestState.DEFINED  # installed, shut off
    since = lab.events.mark()
    try:
        info = create_transient(lab.hv, install_xml(spec))
        assert boot_order(get_xml(lab.hv, spec.uuid)) == ["hd", "network"]
        report = wait_for_ready(spec)
        # The disk won: no second install (which would have powered the guest off).
        assert report.disk_marker == "pxe"
        assert report.installed_marker is None
        assert info.persistent  # the running install config sits on top of the defined guest
        assert get_info(lab.hv, spec.uuid).state is GuestState.RUNNING
        events = [e.event for e in lab.events.for_guest(spec.uuid, since)]
        assert "started" in events
        assert "stopped" not in events
    finally:
        destroy(lab.hv, spec.uuid)
    after = get_info(lab.hv, spec.uuid)
    assert after.state is GuestState.DEFINED
    assert boot_order(get_xml(lab.hv, spec.uuid, inactive=True)) == ["hd"]


def test_it_imports_a_copy_of_an_installed_disk(
    lab: Lab, tracker: Tracker, kernel_install: InstallRun
) -> None:
    marker = tinyguest.parse_console(kernel_install.console).installed_marker
    copy = copy_installed_disk(lab, tracker, kernel_install, "import")
    original = hv_storage.get_volume(lab.hv, kernel_install.disk.pool, kernel_install.disk.volume)
    cloned = hv_storage.get_volume(lab.hv, copy.pool, copy.volume)
    assert cloned.path != original.path
    assert cloned.capacity == original.capacity

    spec = guest_spec(lab, tracker, "import", copy)
    assert install_xml(spec) == final_xml(spec)  # nothing to install: one config
    defined = define(lab.hv, final_xml(spec))
    assert defined.persistent
    assert defined.state is GuestState.DEFINED

    report = boot_disk_and_read_marker(lab, spec)
    assert report.disk_marker == marker


def test_it_runs_an_installed_disk_as_a_transient_guest_that_is_gone_after_destroy(
    lab: Lab, tracker: Tracker, kernel_install: InstallRun
) -> None:
    marker = tinyguest.parse_console(kernel_install.console).installed_marker
    disk = copy_installed_disk(lab, tracker, kernel_install, "transient")
    spec = guest_spec(lab, tracker, "import", disk)

    info = create_transient(lab.hv, final_xml(spec))
    assert not info.persistent
    assert wait_for_ready(spec).disk_marker == marker

    gone = destroy(lab.hv, spec.uuid)
    assert gone.state is GuestState.UNDEFINED
    assert not get_info(lab.hv, spec.uuid).exists


def test_it_runs_an_installed_disk_as_a_persistent_guest_that_stays_defined_after_destroy(
    lab: Lab, tracker: Tracker, kernel_install: InstallRun
) -> None:
    marker = tinyguest.parse_console(kernel_install.console).installed_marker
    disk = copy_installed_disk(lab, tracker, kernel_install, "persistent")
    spec = guest_spec(lab, tracker, "import", disk)

    define(lab.hv, final_xml(spec))
    report = boot_disk_and_read_marker(lab, spec)
    assert report.disk_marker == marker

    stopped = destroy(lab.hv, spec.uuid)
    assert stopped.state is GuestState.DEFINED
    assert stopped.reason == "destroyed"
    assert stopped.persistent
