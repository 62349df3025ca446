"""Migration between two real libvirt hosts on this machine: this test process's libvirtd (host A,
QEMU_URI) and a second one (host B, tests/support/hosts.py).

Host B is a libvirtd in a mount namespace of its own (scripts/second-libvirtd.sh) with its own
host UUID, as host A is; both see /var/lib/libvirt/images, so a pool defined on both at the same
folder is shared storage. The tiny guest is installed once onto a volume in that pool (marker
written by host A); each test boots a copy of it with the runtime initramfs, which prints
``VMPORTAL-DISK: <marker>`` read from its disk and then ``VMPORTAL-ALIVE <uptime>`` every 5 s.
A guest that keeps counting its uptime across a migration was moved, not rebooted.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from provisioning.demo import tinyguest
from provisioning.hypervisor import (
    GuestState,
    Hypervisor,
    HypervisorError,
    InvalidConfig,
    MigrationAborted,
    MigrationProgress,
    NotFound,
    SameHost,
    UnsafeMigration,
    Unsupported,
    WrongState,
    abort_migration,
    clone_volume,
    create_transient,
    create_volume,
    define,
    delete_volume,
    destroy,
    ensure_dir_pool,
    get_info,
    get_volume,
    host_uuid,
    migrate,
    migration_progress,
    remove_pool,
    start,
    undefine,
)
from provisioning.hypervisor.migration import _explain as explain_migration_error
from provisioning.hypervisor.migration import _progress as progress_from_stats
from tests.support.domains import domain_xml, new_uuid
from tests.support.hosts import SCRIPT, SecondHost, second_host, second_libvirtd  # noqa: F401
from tests.support.libvirt import QEMU_URI
from tests.support.qemu import DEMO_CACHE, DOMAIN_TYPE, POOL_PARENT, STAGE_PARENT, unique
from tests.support.stack import wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(600)]

MIB = 1024 * 1024
DISK_BYTES = 80 * MIB  # the installer wants at least 64 MiB
MEMORY_MIB = 192  # the installer needs 128 MiB
BOOT_TIMEOUT = 90.0
INSTALL_TIMEOUT = 120.0
MIGRATION_TIMEOUT = 120.0
ALIVE_RE = re.compile(r"VMPORTAL-ALIVE (\d+(?:\.\d+)?)")


def migration_uri() -> str:
    """Where the destination listens for the memory stream: a port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


# --------------------------------------------------------------------------- hosts and media


@pytest.fixture(scope="module")
def host_a() -> Iterator[Hypervisor]:
    hv = Hypervisor(QEMU_URI)
    try:
        hv.version()
    except HypervisorError as exc:
        pytest.skip(f"{QEMU_URI} unreachable: {exc}")
    yield hv
    hv.close()


@pytest.fixture(scope="module")
def host_b(second_libvirtd: SecondHost) -> Iterator[Hypervisor]:  # noqa: F811
    hv = Hypervisor(second_libvirtd.uri)
    yield hv
    hv.close()


@dataclass(frozen=True)
class Media:
    """Kernel and initramfs pair staged where both hosts' QEMU can read them, plus a log folder."""

    kernel: Path
    installer: Path
    runtime: Path
    logs: Path


@pytest.fixture(scope="module")
def media() -> Iterator[Media]:
    guest = tinyguest.cached(DEMO_CACHE) or tinyguest.build(DEMO_CACHE)
    root = STAGE_PARENT / unique("mig")
    root.mkdir(mode=0o755, parents=True)
    try:
        shutil.copyfile(guest.kernel, root / "vmlinuz")
        shutil.copyfile(guest.initrd, root / "initrd.img")
        shutil.copyfile(guest.runtime_initrd, root / "initrd-runtime.img")
        # Both hosts' virtlogd (root) write the console logs here.
        (root / "logs").mkdir()
        for path in (root, *root.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield Media(
            root / "vmlinuz", root / "initrd.img", root / "initrd-runtime.img", root / "logs"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_pool(host_a: Hypervisor, host_b: Hypervisor) -> Iterator[str]:
    """One folder defined as the same pool on both hosts: shared storage."""
    name = unique("pool")
    path = str(POOL_PARENT / name)
    try:
        ensure_dir_pool(host_a, name, path)
        ensure_dir_pool(host_b, name, path)
        yield name
    finally:
        # Same files on both: only one host deletes the volumes.
        remove_pool(host_b, name)
        remove_pool(host_a, name, delete_volumes=True)


# --------------------------------------------------------------------------- guests


@dataclass
class Undo:
    """Cleanup steps, run newest first even when some fail."""

    steps: list[tuple[str, Callable[[], object]]] = field(default_factory=list)

    def add(self, what: str, step: Callable[[], object]) -> None:
        self.steps.append((what, step))

    def run(self) -> None:
        failures = []
        while self.steps:
            what, step = self.steps.pop()
            try:
                step()
            except (HypervisorError, OSError) as exc:
                failures.append(f"{what}: {exc}")
        if failures:
            raise AssertionError("cleanup failed: " + "; ".join(failures))


def forget_guest(hosts: tuple[Hypervisor, ...], uuid: str) -> Callable[[], None]:
    """A cleanup step: the guest destroyed and undefined on every host."""

    def step() -> None:
        for hv in hosts:
            destroy(hv, uuid)
            undefine(hv, uuid)

    return step


@pytest.fixture
def undo() -> Iterator[Undo]:
    steps = Undo()
    yield steps
    steps.run()


def guest_xml(
    media: Media,
    *,
    uuid: str,
    pool: str,
    volume: str,
    log: Path,
    install_marker: str | None = None,
) -> str:
    """The tiny guest on a pool volume, its console appended to log (kept across migrations)."""
    xml = domain_xml(
        uuid=uuid,
        name=unique("mig"),
        domain_type=DOMAIN_TYPE,
        memory_mib=MEMORY_MIB,
        kernel=str(media.kernel),
        initrd=str(media.installer if install_marker else media.runtime),
        cmdline=(
            tinyguest.install_cmdline(install_marker)
            if install_marker
            else tinyguest.runtime_cmdline()
        ),
        disk=(pool, volume),
        serial_log=str(log),
        on_reboot="destroy" if install_marker else "restart",
    )
    root = etree.fromstring(xml.encode())
    # The destination's virtlogd opens the log again: appending keeps the source's lines.
    root.find("devices/serial/log").set("append", "on")  # type: ignore[union-attr]
    return etree.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class InstalledDisk:
    """A volume in the shared pool that host A's installer wrote, with its marker."""

    pool: str
    volume: str
    marker: str


@pytest.fixture(scope="module")
def installed(host_a: Hypervisor, shared_pool: str, media: Media) -> InstalledDisk:
    """The tiny guest installed once by host A onto the shared pool."""
    uuid = new_uuid()
    marker = f"mig{uuid[:8]}"
    volume = f"installed-{uuid[:8]}.qcow2"
    create_volume(host_a, shared_pool, volume, DISK_BYTES)
    log = media.logs / f"install-{uuid[:8]}.log"
    xml = guest_xml(
        media, uuid=uuid, pool=shared_pool, volume=volume, log=log, install_marker=marker
    )
    try:
        create_transient(host_a, xml)
        # A transient guest that powered off is gone: UNDEFINED.
        wait_until(
            lambda: not get_info(host_a, uuid).active, timeout=INSTALL_TIMEOUT, what="install"
        )
    finally:
        destroy(host_a, uuid)
    report = tinyguest.parse_console(log.read_text(errors="replace"))
    assert report.installed_marker == marker, log.read_text(errors="replace")[-2000:]
    return InstalledDisk(shared_pool, volume, marker)


@dataclass
class Guest:
    """A tiny guest booted from a copy of the installed disk."""

    uuid: str
    volume: str
    log: Path

    def console(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def uptimes(self) -> list[float]:
        """Every VMPORTAL-ALIVE uptime printed so far, in order."""
        return [float(m) for m in ALIVE_RE.findall(self.console())]

    def wait_for_alive_after(self, uptime: float) -> float:
        """Wait for an ALIVE line with a later uptime than the given one; return it."""

        def later() -> float | None:
            return next((u for u in self.uptimes() if u > uptime), None)

        found = wait_until(
            later,
            timeout=BOOT_TIMEOUT,
            what=f"VMPORTAL-ALIVE after uptime {uptime} from {self.uuid}",
            every=0.2,
        )
        assert found is not None
        return found

    def wait_ready(self, boots: int = 1) -> None:
        """Wait until the guest's boots-th boot read its disk and printed an ALIVE line."""

        def ready() -> bool:
            text = self.console()
            after_ready = text.rsplit("VMPORTAL-READY", 1)[-1]
            return text.count("VMPORTAL-READY") >= boots and "VMPORTAL-ALIVE" in after_ready

        wait_until(ready, timeout=BOOT_TIMEOUT, what=f"boot {boots} of {self.uuid}", every=0.2)


@pytest.fixture
def make_guest(
    host_a: Hypervisor,
    host_b: Hypervisor,
    installed: InstalledDisk,
    media: Media,
    undo: Undo,
) -> Callable[..., Guest]:
    """Factory: a guest defined on host A on a copy of the installed disk, started unless told."""

    def make(*, running: bool = True) -> Guest:
        uuid = new_uuid()
        volume = f"guest-{uuid[:8]}.qcow2"
        clone_volume(host_a, installed.pool, installed.volume, volume)
        undo.add(f"volume {volume}", lambda: delete_volume(host_a, installed.pool, volume))
        log = media.logs / f"{uuid[:8]}.log"
        undo.add(f"guest {uuid}", forget_guest((host_a, host_b), uuid))
        define(host_a, guest_xml(media, uuid=uuid, pool=installed.pool, volume=volume, log=log))
        guest = Guest(uuid, volume, log)
        if running:
            start(host_a, uuid)
            guest.wait_ready()
        return guest

    return make


class ProgressWatcher:
    """Polls migration_progress from its own thread until stopped; keeps every sample."""

    def __init__(self, hv: Hypervisor, uuid: str) -> None:
        self.hv = hv
        self.uuid = uuid
        self.samples: list[MigrationProgress] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(migration_progress(self.hv, self.uuid))
            except NotFound:
                return  # the guest left the source: the migration finished
            self._stop.wait(0.05)

    def __enter__(self) -> ProgressWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def migrating(self) -> list[MigrationProgress]:
        return [s for s in self.samples if s.migrating and s.operation == "migration_out"]


class Background:
    """Runs a call in a thread and keeps its result or exception."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"still running after {timeout} s"


# --------------------------------------------------------------------------- tests


def test_the_second_host_has_its_own_host_uuid_and_name(
    host_a: Hypervisor,
    host_b: Hypervisor,
    second_libvirtd: SecondHost,  # noqa: F811
) -> None:
    assert host_uuid(host_a) != host_uuid(host_b)
    assert host_b.host_info().hostname == second_libvirtd.name
    assert second_libvirtd.uri.startswith("qemu+unix:///system?socket=")


def test_it_refuses_to_migrate_to_the_same_host_under_another_uri(host_a: Hypervisor) -> None:
    # The same socket spelt with a ./ segment: another URI, the same daemon.
    alias = QEMU_URI.replace("/sock/libvirt-sock", "/sock/./libvirt-sock", 1)
    if alias == QEMU_URI:
        pytest.skip(f"no second URI form known for {QEMU_URI}")
    same = Hypervisor(alias)
    try:
        with pytest.raises(SameHost):
            migrate(host_a, same, new_uuid(), live=True, migration_uri=migration_uri())
    finally:
        same.close()


def fake_error(code: int, message: str) -> libvirt.libvirtError:
    """A libvirtError from the QEMU driver, as libvirt would fill it in."""
    exc = libvirt.libvirtError(message)
    exc.err = (code, libvirt.VIR_FROM_QEMU, message, libvirt.VIR_ERR_ERROR, None, None, None, 0, 0)
    return exc


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (
            libvirt.VIR_ERR_INTERNAL_ERROR,
            "internal error: Attempt to migrate guest to the same host 6f1c2a4e",
            SameHost,
        ),
        (
            libvirt.VIR_ERR_OPERATION_ABORTED,
            "operation aborted: job 'migration out' canceled by client",
            MigrationAborted,
        ),
        (
            libvirt.VIR_ERR_MIGRATE_UNSAFE,
            "Unsafe migration: Migration without shared storage is unsafe",
            UnsafeMigration,
        ),
        (
            libvirt.VIR_ERR_NO_STORAGE_VOL,
            "Storage volume not found: no storage vol with matching name 'd.qcow2'",
            InvalidConfig,
        ),
        (libvirt.VIR_ERR_NO_DOMAIN, "Domain not found", NotFound),
    ],
    ids=["same-host", "aborted", "unsafe", "no-volume", "no-domain"],
)
def test_it_names_libvirts_migration_refusals(
    host_b: Hypervisor, code: int, message: str, expected: type[HypervisorError]
) -> None:
    err = explain_migration_error(fake_error(code, message), new_uuid(), host_b)

    assert type(err) is expected
    assert message in err.message


def test_progress_counts_what_remains_and_reports_no_job_as_none() -> None:
    moving = progress_from_stats(
        "u",
        {
            "type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED,
            "operation": libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT,
            "data_total": 200,
            "data_processed": 180,  # dirty pages sent again count here, not in what remains
            "data_remaining": 150,
        },
    )
    idle = progress_from_stats("u", {"type": libvirt.VIR_DOMAIN_JOB_NONE})

    assert (moving.migrating, moving.operation, moving.percent) == (True, "migration_out", 25.0)
    assert (idle.active, idle.migrating, idle.percent) == (False, False, None)


def test_the_script_starts_idempotently_and_stops_only_its_own_daemons(
    host_a: Hypervisor,
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="vmportal-hostc-", dir="/tmp"))
    try:
        first = second_host(folder, name="vmportal-hostc")
        pids = [int((folder / f"{d}.pid").read_text()) for d in ("libvirtd", "virtlogd")]
        again = second_host(folder, name="vmportal-hostc")
        pids_again = [int((folder / f"{d}.pid").read_text()) for d in ("libvirtd", "virtlogd")]
        first.stop()

        assert again.uri == first.uri == f"qemu+unix:///system?socket={folder}/sock/libvirt-sock"
        assert pids_again == pids
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
        assert not (folder / "sock").exists()
        assert host_a.version()["hostname"] != "vmportal-hostc"
    finally:
        subprocess.run([str(SCRIPT), "purge", str(folder)], check=False, timeout=120)


def test_it_refuses_to_copy_storage_in_an_offline_migration(
    host_a: Hypervisor, host_b: Hypervisor
) -> None:
    with pytest.raises(Unsupported):
        migrate(host_a, host_b, new_uuid(), live=False, copy_storage=True)


def test_it_moves_a_running_guest_live_and_back(
    host_a: Hypervisor, host_b: Hypervisor, make_guest: Callable[..., Guest]
) -> None:
    guest = make_guest()
    before = guest.wait_for_alive_after(0.0)

    # A bandwidth cap stretches the migration over several seconds: progress to observe.
    began = time.monotonic()
    with ProgressWatcher(host_a, guest.uuid) as watcher:
        moved = migrate(
            host_a,
            host_b,
            guest.uuid,
            live=True,
            migration_uri=migration_uri(),
            unsafe=True,
            bandwidth_mib=16,
        )
    took = time.monotonic() - began
    completed = migration_progress(host_b, guest.uuid, completed=True)
    after = guest.wait_for_alive_after(before)

    assert (moved.state, moved.reason, moved.persistent) == (GuestState.RUNNING, "migrated", True)
    assert get_info(host_b, guest.uuid).state is GuestState.RUNNING
    assert not get_info(host_a, guest.uuid).exists
    percents = [s.percent for s in watcher.migrating() if s.percent is not None]
    assert any(0 < p < 100 for p in percents), f"no progress seen in {took:.1f} s: {percents}"
    assert (completed.job_type, completed.operation) == ("completed", "migration_in")
    assert completed.data_processed and completed.data_processed > 0
    # Still the same boot, still counting: moved, not restarted.
    assert guest.console().count("VMPORTAL-READY") == 1
    assert guest.uptimes() == sorted(guest.uptimes())
    assert after > before

    back = migrate(
        host_b, host_a, guest.uuid, live=True, migration_uri=migration_uri(), unsafe=True
    )
    again = guest.wait_for_alive_after(after)

    assert (back.state, back.persistent) == (GuestState.RUNNING, True)
    assert not get_info(host_b, guest.uuid).exists
    assert get_info(host_a, guest.uuid).persistent
    assert guest.console().count("VMPORTAL-READY") == 1
    assert again > after


def test_it_refuses_unsafe_or_offline_migration_of_a_running_guest(
    host_a: Hypervisor, host_b: Hypervisor, make_guest: Callable[..., Guest]
) -> None:
    guest = make_guest()

    # The disk's cache mode is not 'none' and libvirt cannot tell the folder is shared.
    with pytest.raises(UnsafeMigration):
        migrate(host_a, host_b, guest.uuid, live=True, migration_uri=migration_uri())
    with pytest.raises(WrongState):
        migrate(host_a, host_b, guest.uuid, live=False)

    assert get_info(host_a, guest.uuid).state is GuestState.RUNNING
    assert not get_info(host_b, guest.uuid).exists


def test_it_moves_a_defined_guest_offline_onto_the_same_disk(
    host_a: Hypervisor,
    host_b: Hypervisor,
    make_guest: Callable[..., Guest],
    installed: InstalledDisk,
) -> None:
    guest = make_guest(running=False)

    with pytest.raises(WrongState):
        migrate(host_a, host_b, guest.uuid, live=True, migration_uri=migration_uri())
    moved = migrate(host_a, host_b, guest.uuid, live=False)
    with pytest.raises(NotFound):
        migrate(host_a, host_b, guest.uuid, live=False)
    started = start(host_b, guest.uuid)
    guest.wait_ready()

    assert (moved.state, moved.persistent) == (GuestState.DEFINED, True)
    assert not get_info(host_a, guest.uuid).exists
    assert started.state is GuestState.RUNNING
    # Host B booted the disk host A's installer wrote: the storage is shared.
    assert tinyguest.parse_console(guest.console()).disk_marker == installed.marker


def test_an_aborted_migration_leaves_the_guest_running_on_the_source(
    host_a: Hypervisor, host_b: Hypervisor, make_guest: Callable[..., Guest]
) -> None:
    guest = make_guest()

    # 1 MiB/s: the guest's ~80 MiB of memory would take over a minute.
    running = Background(
        lambda: migrate(
            host_a,
            host_b,
            guest.uuid,
            live=True,
            migration_uri=migration_uri(),
            unsafe=True,
            bandwidth_mib=1,
        )
    )

    def moving() -> MigrationProgress | None:
        progress = migration_progress(host_a, guest.uuid)
        return progress if progress.migrating and (progress.data_processed or 0) > 0 else None

    seen = wait_until(
        moving,
        timeout=MIGRATION_TIMEOUT,
        what="the migration moving data",
    )
    aborted = abort_migration(host_a, guest.uuid)
    running.join(MIGRATION_TIMEOUT)
    last = guest.uptimes()[-1]

    assert seen is not None and seen.percent is not None and seen.percent < 100
    assert aborted is True
    assert isinstance(running.error, MigrationAborted), running.error
    assert get_info(host_a, guest.uuid).state is GuestState.RUNNING
    wait_until(
        lambda: not get_info(host_b, guest.uuid).exists,
        timeout=30,
        what="the destination to drop the guest",
    )
    assert guest.wait_for_alive_after(last) > last
    assert migration_progress(host_a, guest.uuid).percent is None
    assert abort_migration(host_a, guest.uuid) is False


def pool_remover(hv: Hypervisor, pool: str) -> Callable[[], None]:
    """A cleanup step: the pool and its volumes removed from hv."""
    return lambda: remove_pool(hv, pool, delete_volumes=True)


def _copy_volume(hv: Hypervisor, src_pool: str, volume: str, dst_pool: str) -> None:
    """Copy a volume into another pool of the same host (a helper only this test needs)."""

    def run(conn: libvirt.virConnect) -> None:
        base = conn.storagePoolLookupByName(src_pool).storageVolLookupByName(volume)
        root = etree.Element("volume")
        etree.SubElement(root, "name").text = volume
        etree.SubElement(root, "capacity", unit="bytes").text = str(base.info()[1])
        target = etree.SubElement(root, "target")
        etree.SubElement(target, "format", type="qcow2")
        xml = etree.tostring(root, encoding="unicode")
        conn.storagePoolLookupByName(dst_pool).createXMLFrom(xml, base, 0)

    hv.call(run, idempotent=False)


def test_copy_storage_moves_the_disk_into_the_destination_pool(
    host_a: Hypervisor,
    host_b: Hypervisor,
    installed: InstalledDisk,
    media: Media,
    undo: Undo,
) -> None:
    # Same pool name on both hosts, different folders: storage that is not shared.
    pool = unique("local")
    for hv, suffix in ((host_a, "a"), (host_b, "b")):
        ensure_dir_pool(hv, pool, str(POOL_PARENT / f"{pool}-{suffix}"))
        undo.add(f"pool {pool} on {hv.uri}", pool_remover(hv, pool))
    uuid = new_uuid()
    _copy_volume(host_a, installed.pool, installed.volume, pool)
    log = media.logs / f"{uuid[:8]}.log"
    undo.add(f"guest {uuid}", forget_guest((host_a, host_b), uuid))
    define(host_a, guest_xml(media, uuid=uuid, pool=pool, volume=installed.volume, log=log))
    start(host_a, uuid)
    guest = Guest(uuid, installed.volume, log)
    guest.wait_ready()

    moved = migrate(
        host_a, host_b, uuid, live=True, migration_uri=migration_uri(), copy_storage=True
    )
    copied = get_volume(host_b, pool, installed.volume)
    # Boot host B's copy afresh: the marker proves the disk's content arrived.
    destroy(host_b, uuid)
    start(host_b, uuid)
    guest.wait_ready(boots=2)

    assert (moved.state, moved.persistent) == (GuestState.RUNNING, True)
    assert not get_info(host_a, uuid).exists
    assert copied.path.startswith(str(POOL_PARENT / f"{pool}-b"))
    assert copied.capacity == DISK_BYTES
    assert tinyguest.parse_console(guest.console()).disk_marker == installed.marker
