"""Real QEMU guests (TCG) through this process's libvirtd: the tiny guest of provisioning.demo."""

from __future__ import annotations

import json
import subprocess
import time
import uuid as uuid_module
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from provisioning.hypervisor import (
    AlreadyExists,
    DomainInfo,
    EventListener,
    GuestState,
    Hypervisor,
    HypervisorError,
    NotFound,
    clone_volume,
    create_overlay,
    create_transient,
    create_volume,
    define,
    delete_volume,
    destroy,
    ensure_dir_pool,
    get_info,
    get_pool,
    get_volume,
    job_stats,
    list_domains,
    make_persistent,
    managed_save,
    probe_boot,
    probe_kvm,
    remove_pool,
    restore,
    resume,
    save,
    set_autostart,
    shutdown,
    snapshots,
    start,
    stats,
    suspend,
    undefine,
    upload_bytes,
    upload_file,
    wait_for,
    wait_for_stop,
)
from provisioning.hypervisor.probe import BANNER, PROBE_NAME_PREFIX
from tests.support.domains import domain_xml, new_uuid
from tests.support.events import Inbox
from tests.support.libvirt import QEMU_URI
from tests.support.qemu import DEMO_CACHE, MIB, POOL_PARENT
from tests.support.stack import wait_until

pytestmark = pytest.mark.qemu

DISK_BYTES = 80 * MIB  # the installer wants at least 64 MiB
MEMORY_MIB = 192  # the installer needs 128 MiB
BOOT_TIMEOUT = 60.0
INSTALL_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def qemu_hv() -> Iterator[Hypervisor]:
    hv = Hypervisor(QEMU_URI)
    try:
        hv.version()
    except HypervisorError as exc:
        pytest.skip(f"{QEMU_URI} unreachable: {exc}")
    yield hv
    hv.close()


@pytest.fixture(scope="module")
def tiny():  # -> TinyGuest
    from provisioning.demo import tinyguest

    guest = tinyguest.cached(DEMO_CACHE)
    if guest is None:
        guest = tinyguest.build(DEMO_CACHE)
    return guest


@pytest.fixture(scope="module")
def pool(qemu_hv: Hypervisor) -> Iterator[str]:
    """A throwaway directory pool, removed with its volumes afterwards."""
    name = f"vmportal-hvtest-{uuid_module.uuid4().hex[:8]}"
    ensure_dir_pool(qemu_hv, name, str(POOL_PARENT / name))
    yield name
    remove_pool(qemu_hv, name, delete_volumes=True)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serial")


@dataclass
class Guest:
    """A tiny guest booted by a test: its uuid, XML, disk and serial log."""

    hv: Hypervisor
    uuid: str
    xml: str
    pool: str
    volume: str
    log: Path

    def console(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_console(self, text: str, timeout: float = BOOT_TIMEOUT) -> None:
        wait_until(
            lambda: text in self.console(),
            timeout=timeout,
            what=f"{text!r} on the serial console of {self.uuid}",
        )

    def cpu_time_ns(self) -> int:
        """What the guest's vCPU threads have run. Not info()'s CPU time: that is the whole QEMU
        process's, whose main loop can tick (10 ms, seen) while the vCPUs stay paused."""
        vcpus, _pinning = self.hv.connection().lookupByUUIDString(self.uuid).vcpus()
        return sum(int(cpu_time) for _number, _state, cpu_time, _cpu in vcpus)

    def remove(self) -> None:
        destroy(self.hv, self.uuid)
        undefine(self.hv, self.uuid)
        delete_volume(self.hv, self.pool, self.volume)


def make_guest(hv: Hypervisor, tiny, pool: str, logs: Path, *, install: bool = False) -> Guest:
    uuid = new_uuid()
    volume = f"{uuid[:8]}.qcow2"
    create_volume(hv, pool, volume, DISK_BYTES)
    log = logs / f"{uuid[:8]}.log"
    cmdline = f"console=ttyS0 vmportal.install=1 vmportal.marker=m{uuid[:8]}" if install else None
    xml = domain_xml(
        uuid=uuid,
        domain_type="qemu",
        memory_mib=MEMORY_MIB,
        kernel=str(tiny.kernel),
        initrd=str(tiny.initrd if install else tiny.runtime_initrd),
        cmdline=cmdline or "console=ttyS0",
        disk=(pool, volume),
        serial_log=str(log),
        on_reboot="destroy" if install else "restart",
    )
    return Guest(hv, uuid, xml, pool, volume, log)


@dataclass
class Boot:
    """What was seen while the shared guest booted with START_PAUSED and went persistent."""

    guest: Guest
    paused: DomainInfo
    cpu_before: int
    cpu_after: int
    console_while_paused: str
    resumed: DomainInfo
    transient: DomainInfo
    persistent: DomainInfo


@pytest.fixture(scope="module")
def boot(qemu_hv: Hypervisor, tiny, pool: str, logs: Path) -> Iterator[Boot]:
    """The module's shared guest: started paused, resumed, booted, then made persistent."""
    guest = make_guest(qemu_hv, tiny, pool, logs)
    try:
        paused = create_transient(qemu_hv, guest.xml, paused=True)
        cpu_before = guest.cpu_time_ns()
        # Measuring that nothing happens needs an interval; this one is not synchronisation.
        time.sleep(1.0)
        cpu_after = guest.cpu_time_ns()
        console_while_paused = guest.console()
        resumed = resume(qemu_hv, guest.uuid)
        guest.wait_for_console("VMPORTAL-READY")
        transient = get_info(qemu_hv, guest.uuid)
        persistent = make_persistent(qemu_hv, guest.uuid, guest.xml)
        yield Boot(
            guest,
            paused,
            cpu_before,
            cpu_after,
            console_while_paused,
            resumed,
            transient,
            persistent,
        )
    finally:
        guest.remove()


@pytest.fixture
def guest(boot: Boot, qemu_hv: Hypervisor) -> Guest:
    """The shared guest, running and ready (booted again if an earlier test stopped it)."""
    shared = boot.guest
    info = get_info(qemu_hv, shared.uuid)
    if info.state is GuestState.PAUSED:
        resume(qemu_hv, shared.uuid)
    elif info.state is not GuestState.RUNNING:
        start(qemu_hv, shared.uuid, force_boot=True)
        shared.wait_for_console("VMPORTAL-READY")
    return shared


def test_a_guest_started_paused_does_not_run_until_resumed(boot: Boot) -> None:
    assert (boot.paused.state, boot.paused.persistent) == (GuestState.PAUSED, False)
    assert boot.cpu_after == boot.cpu_before
    assert "Linux version" not in boot.console_while_paused
    assert boot.resumed.state is GuestState.RUNNING
    assert "VMPORTAL-READY" in boot.guest.console()


def test_define_on_a_running_transient_guest_makes_it_persistent(boot: Boot) -> None:
    assert (boot.transient.state, boot.transient.persistent) == (GuestState.RUNNING, False)
    assert (boot.persistent.state, boot.persistent.persistent) == (GuestState.RUNNING, True)


def test_suspend_and_resume(qemu_hv: Hypervisor, guest: Guest) -> None:
    paused = suspend(qemu_hv, guest.uuid)
    resumed = resume(qemu_hv, guest.uuid)

    assert (paused.state, paused.reason) == (GuestState.PAUSED, "user")
    assert (resumed.state, resumed.reason) == (GuestState.RUNNING, "unpaused")


def test_job_stats_report_no_job_on_an_idle_guest(qemu_hv: Hypervisor, guest: Guest) -> None:
    stats = job_stats(qemu_hv, guest.uuid)

    assert stats["type"] == libvirt.VIR_DOMAIN_JOB_NONE


def test_one_bulk_call_reads_a_running_guests_cpu_memory_and_disk(
    qemu_hv: Hypervisor, guest: Guest
) -> None:
    first = stats.sample(qemu_hv)[guest.uuid]
    # The guest's CPU time moves on while it runs (its timer ticks even when idle).
    later = wait_until(
        lambda: (c := stats.sample(qemu_hv)[guest.uuid]).cpu_ns > first.cpu_ns and c,
        timeout=30,
        what="the guest's CPU time to grow",
    )
    used = stats.rates(first, later)

    assert first.vcpus == 1
    assert first.mem_used_bytes and first.mem_used_bytes > 1 * MIB  # QEMU's own memory
    assert first.disk_read_bytes and first.disk_read_bytes > 0  # its boot read the disk
    assert used.cpu_percent is not None and 0 < used.cpu_percent <= 100
    assert used.disk_read_bps is not None and used.disk_read_bps >= 0


def test_a_disk_snapshot_reverted_brings_back_the_disk_from_before_a_later_install(
    qemu_hv: Hypervisor, tiny, pool: str, logs: Path
) -> None:
    """Snapshot, write a marker, revert: the marker is gone (the guest's own serial output says
    what its disk holds)."""
    first = make_guest(qemu_hv, tiny, pool, logs, install=True)
    writer: str | None = None
    try:
        create_transient(qemu_hv, first.xml)
        wait_for_stop(qemu_hv, first.uuid, INSTALL_TIMEOUT)
        assert f"VMPORTAL-INSTALL-DONE m{first.uuid[:8]}" in first.console()
        runtime = domain_xml(
            uuid=first.uuid,
            domain_type="qemu",
            memory_mib=MEMORY_MIB,
            kernel=str(tiny.kernel),
            initrd=str(tiny.runtime_initrd),
            cmdline="console=ttyS0",
            disk=(first.pool, first.volume),
            serial_log=str(logs / f"{first.uuid[:8]}-runtime.log"),
        )
        define(qemu_hv, runtime)
        taken = snapshots.create_snapshot(qemu_hv, first.uuid, "before", "the first install")
        # Another install over the same disk writes another marker.
        writer = new_uuid()
        overwrite = domain_xml(
            uuid=writer,
            domain_type="qemu",
            memory_mib=MEMORY_MIB,
            kernel=str(tiny.kernel),
            initrd=str(tiny.initrd),
            cmdline="console=ttyS0 vmportal.install=1 vmportal.marker=later",
            disk=(first.pool, first.volume),
            serial_log=str(logs / f"{writer[:8]}.log"),
            on_reboot="destroy",
        )
        create_transient(qemu_hv, overwrite)
        wait_for_stop(qemu_hv, writer, INSTALL_TIMEOUT)
        assert "VMPORTAL-INSTALL-DONE later" in (logs / f"{writer[:8]}.log").read_text()

        reverted = snapshots.revert_snapshot(qemu_hv, first.uuid, "before")
        start(qemu_hv, first.uuid)
        console = logs / f"{first.uuid[:8]}-runtime.log"
        wait_until(
            lambda: "VMPORTAL-READY" in console.read_text(errors="replace"),
            timeout=BOOT_TIMEOUT,
            what="the reverted guest to boot",
        )

        assert (taken.state, taken.memory, taken.description) == (
            "shutoff",
            False,
            "the first install",
        )
        assert reverted.state is GuestState.DEFINED
        text = console.read_text(errors="replace")
        assert f"VMPORTAL-DISK: m{first.uuid[:8]}" in text
        assert "later" not in text
        assert [s.name for s in snapshots.list_snapshots(qemu_hv, first.uuid)] == ["before"]
    finally:
        if writer is not None:
            destroy(qemu_hv, writer)
        snapshots.delete_all_metadata(qemu_hv, first.uuid)
        first.remove()


def test_a_running_guests_snapshot_with_memory_reverts_to_running(
    qemu_hv: Hypervisor, guest: Guest
) -> None:
    taken = snapshots.create_snapshot(qemu_hv, guest.uuid, "warm")
    try:
        suspend(qemu_hv, guest.uuid)

        reverted = snapshots.revert_snapshot(qemu_hv, guest.uuid, "warm")

        assert (taken.state, taken.memory) == ("running", True)
        assert reverted.state is GuestState.RUNNING  # as it was when taken, not paused
    finally:
        snapshots.delete_snapshot(qemu_hv, guest.uuid, "warm")
    assert snapshots.list_snapshots(qemu_hv, guest.uuid) == []


def test_save_to_a_file_and_restore(qemu_hv: Hypervisor, guest: Guest, tmp_path: Path) -> None:
    image = tmp_path / "guest.save"

    saved = save(qemu_hv, guest.uuid, str(image))
    restored = restore(qemu_hv, str(image))

    assert (saved.state, saved.reason) == (GuestState.SAVED, "saved")
    assert image.stat().st_size > 0
    assert (restored.uuid, restored.state, restored.reason) == (
        guest.uuid,
        GuestState.RUNNING,
        "restored",
    )


def test_managed_save_then_start_restores_the_guest(qemu_hv: Hypervisor, guest: Guest) -> None:
    saved = managed_save(qemu_hv, guest.uuid)
    started = start(qemu_hv, guest.uuid)

    assert (saved.state, saved.has_managed_save) == (GuestState.SAVED, True)
    assert (started.state, started.reason, started.has_managed_save) == (
        GuestState.RUNNING,
        "restored",
        False,
    )


def test_autostart_flag_on_a_persistent_guest(qemu_hv: Hypervisor, guest: Guest) -> None:
    try:
        assert set_autostart(qemu_hv, guest.uuid, True).autostart
    finally:
        assert not set_autostart(qemu_hv, guest.uuid, False).autostart


def test_acpi_shutdown_and_destroy_leave_different_reasons(
    qemu_hv: Hypervisor, guest: Guest
) -> None:
    shutdown(qemu_hv, guest.uuid)
    stopped = wait_for_stop(qemu_hv, guest.uuid, timeout=30)
    console = guest.console()
    start(qemu_hv, guest.uuid)
    destroyed = destroy(qemu_hv, guest.uuid)

    assert (stopped.state, stopped.reason) == (GuestState.DEFINED, "shutdown")
    assert "VMPORTAL-POWERDOWN" in console  # the guest saw the ACPI button
    assert (destroyed.state, destroyed.reason) == (GuestState.DEFINED, "destroyed")


def test_autodestroy_ties_the_guest_to_its_connection(
    qemu_hv: Hypervisor, tiny, pool: str, logs: Path
) -> None:
    guest = make_guest(qemu_hv, tiny, pool, logs)
    try:
        with Hypervisor(QEMU_URI) as creator:
            created = create_transient(creator, guest.xml, autodestroy=True)
            assert get_info(qemu_hv, guest.uuid).state is GuestState.RUNNING

        gone = wait_for(qemu_hv, guest.uuid, lambda info: not info.exists, timeout=30)

        assert created.state is GuestState.RUNNING
        assert gone.state is GuestState.UNDEFINED
    finally:
        guest.remove()


def test_listener_sees_a_guest_power_itself_off(
    qemu_hv: Hypervisor, tiny, pool: str, logs: Path
) -> None:
    inbox = Inbox()
    guest = make_guest(qemu_hv, tiny, pool, logs, install=True)
    try:
        with EventListener(QEMU_URI, inbox) as listener:
            assert listener.wait_connected(10)
            create_transient(qemu_hv, guest.xml)

            inbox.expect(guest.uuid, "started", "booted", timeout=10)
            finished = inbox.expect(guest.uuid, "shutdown", timeout=INSTALL_TIMEOUT)
            stopped = inbox.expect(guest.uuid, "stopped", timeout=10)

        assert finished.detail in ("finished", "guest")
        assert stopped.detail == "shutdown"
        assert f"VMPORTAL-INSTALL-DONE m{guest.uuid[:8]}" in guest.console()
    finally:
        guest.remove()


def test_probe_kvm_answers_within_its_deadline_and_leaves_no_guest(
    qemu_hv: Hypervisor, tiny, logs: Path
) -> None:
    log = logs / "kvm-probe.log"
    began = time.monotonic()

    works = probe_kvm(qemu_hv, tiny.kernel, tiny.runtime_initrd, log, timeout=5.0)

    elapsed = time.monotonic() - began
    assert isinstance(works, bool)
    assert elapsed < 5.0 + 20.0  # the deadline plus the time destroy may take
    assert not [i for i in list_domains(qemu_hv) if i.name.startswith(PROBE_NAME_PREFIX)]
    if not log.exists() or BANNER not in log.read_bytes():
        assert works is False


def test_probe_boot_says_yes_for_a_guest_that_boots(qemu_hv: Hypervisor, tiny, logs: Path) -> None:
    log = logs / "qemu-probe.log"

    works = probe_boot(
        qemu_hv, tiny.kernel, tiny.runtime_initrd, log, timeout=30.0, domain_type="qemu"
    )

    assert works is True
    assert BANNER in log.read_bytes()
    assert not [i for i in list_domains(qemu_hv) if i.name.startswith(PROBE_NAME_PREFIX)]


def test_upload_file_registers_a_local_file_as_a_volume(
    qemu_hv: Hypervisor, tiny, pool: str
) -> None:
    source = Path(tiny.runtime_initrd)

    info = upload_file(qemu_hv, pool, "media.img", source)
    try:
        assert (info.name, info.capacity, info.format) == (
            "media.img",
            source.stat().st_size,
            "raw",
        )
        assert Path(info.path).read_bytes() == source.read_bytes()
    finally:
        delete_volume(qemu_hv, pool, "media.img")


def test_upload_bytes_writes_a_seed_into_a_new_volume(qemu_hv: Hypervisor, pool: str) -> None:
    data = bytes(range(256)) * 300

    info = upload_bytes(qemu_hv, pool, "seed.iso", data)

    assert (info.capacity, info.format) == (len(data), "raw")
    assert Path(info.path).read_bytes() == data


def test_an_overlay_reads_through_to_its_base_and_writes_only_itself(
    qemu_hv: Hypervisor, pool: str
) -> None:
    base = upload_bytes(qemu_hv, pool, "base.img", b"BASE" * 1024 * 256)  # 1 MiB, raw

    overlay = create_overlay(qemu_hv, pool, "base.img", "guest.qcow2", 8 * MIB)

    assert (overlay.capacity, overlay.format) == (8 * MIB, "qcow2")
    described = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", overlay.path],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert described["backing-filename"] == base.path
    assert described["backing-filename-format"] == "raw"
    assert described["virtual-size"] == 8 * MIB
    # Smaller than its base: the overlay takes the base's size.
    assert create_overlay(qemu_hv, pool, "base.img", "small.qcow2", 1).capacity == MIB
    with pytest.raises(AlreadyExists):
        create_overlay(qemu_hv, pool, "base.img", "guest.qcow2", 8 * MIB)
    with pytest.raises(NotFound):
        create_overlay(qemu_hv, pool, "no-such-base.img", "other.qcow2", 8 * MIB)


def test_clone_volume_copies_a_qcow2_disk(qemu_hv: Hypervisor, pool: str) -> None:
    create_volume(qemu_hv, pool, "base.qcow2", 16 * MIB)
    try:
        clone = clone_volume(qemu_hv, pool, "base.qcow2", "copy.qcow2")

        assert (clone.capacity, clone.format) == (16 * MIB, "qcow2")
        assert get_volume(qemu_hv, pool, "copy.qcow2") == clone
    finally:
        delete_volume(qemu_hv, pool, "copy.qcow2")
        delete_volume(qemu_hv, pool, "base.qcow2")


def test_remove_pool_deletes_its_volumes_and_directory(qemu_hv: Hypervisor) -> None:
    name = f"vmportal-hvtest-{uuid_module.uuid4().hex[:8]}"
    path = POOL_PARENT / name
    ensure_dir_pool(qemu_hv, name, str(path))
    create_volume(qemu_hv, name, "disk.qcow2", MIB)

    remove_pool(qemu_hv, name, delete_volumes=True)

    assert not path.exists()
    with pytest.raises(NotFound):
        get_pool(qemu_hv, name)
