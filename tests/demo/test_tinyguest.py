"""The tiny real guest: build, cache, artifact contents, and real boots under plain QEMU (TCG)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from provisioning.demo import tinyguest
from provisioning.demo.tinyguest import (
    DISK_MIN_MIB,
    MARKER_OFFSET_MIB,
    BuildError,
    ConsoleReport,
    TinyGuest,
    install_cmdline,
    parse_console,
    runtime_cmdline,
)
from tests.support.qemu import DEMO_CACHE as CACHE_DIR

QEMU = "qemu-system-x86_64"
# Each phase takes 5-15 s under TCG here; the deadline leaves room for a loaded machine.
DEADLINE = 60.0

needs_qemu = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} not installed")


@pytest.fixture(scope="session")
def guest() -> TinyGuest:
    return tinyguest.build(CACHE_DIR)


# --- unit -------------------------------------------------------------------------------------


def test_it_builds_the_install_cmdline_with_the_marker() -> None:
    assert install_cmdline("t1") == "console=ttyS0 vmportal.install=1 vmportal.marker=t1"
    assert install_cmdline("a.B_c-9").endswith("vmportal.marker=a.B_c-9")
    assert install_cmdline("x" * 64).endswith("x" * 64)


def test_it_boots_the_runtime_on_the_serial_console_without_install() -> None:
    assert "console=ttyS0" in runtime_cmdline().split()
    assert "vmportal.install=1" not in runtime_cmdline()


@pytest.mark.parametrize(
    "marker",
    ["", "x" * 65, "two words", "a=b", "rm;-rf", "ünï", "a\nb", "none", "t1 vmportal.install=1"],
)
def test_it_rejects_markers_unsafe_on_a_kernel_cmdline(marker: str) -> None:
    with pytest.raises(ValueError):
        install_cmdline(marker)


def test_it_parses_progress_out_of_noisy_console_text() -> None:
    text = (
        "SYSLINUX 6.04\r\n[    1.77] Run /init as init process\r\n"
        "VMPORTAL-INSTALL-DONE t1\r\n[    2.35] reboot: Power down\r\n"
        "VMPORTAL-DISK: t1\r\nVMPORTAL-READY\r\n"
        "VMPORTAL-ALIVE 2.14\r\n[    7.1] random: noise\r\nVMPORTAL-ALIVE 7.15\r\n"
        "VMPORTAL-POWERDOWN\r\n"
    )
    assert parse_console(text) == ConsoleReport(
        installed_marker="t1",
        disk_marker="t1",
        ready=True,
        alive_count=2,
        install_error=None,
        powering_off=True,
    )


def test_it_reports_nothing_for_a_console_that_said_nothing_yet() -> None:
    report = parse_console("SeaBIOS (version 1.16.2)\r\nBooting from Hard Disk...\r\n")
    assert report == ConsoleReport(None, None, False, 0)


def test_it_reports_a_blank_disk_and_an_install_failure() -> None:
    report = parse_console("VMPORTAL-DISK: none\nVMPORTAL-INSTALL-FAILED disk-too-small\n")
    assert report.disk_marker == tinyguest.NO_MARKER
    assert report.install_error == "disk-too-small"
    assert not report.ready


def test_it_names_the_step_and_the_stderr_tail_when_a_tool_fails() -> None:
    with pytest.raises(BuildError) as caught:
        tinyguest._run(
            "frobnicate", ["sh", "-c", "echo early >&2; echo the-real-cause >&2; exit 3"]
        )
    assert caught.value.step == "frobnicate"
    assert "the-real-cause" in str(caught.value)
    assert "exited 3" in str(caught.value)


def test_it_names_a_missing_tool() -> None:
    with pytest.raises(BuildError, match="no-such-tool-xyz not found"):
        tinyguest._run("step", ["no-such-tool-xyz"])


def test_it_reports_an_empty_cache_dir_as_not_cached(tmp_path: Path) -> None:
    assert tinyguest.cached(tmp_path) is None


# --- the real cache ---------------------------------------------------------------------------


def test_it_reuses_the_cache_without_rebuilding(guest: TinyGuest) -> None:
    messages: list[str] = []
    before = guest.initrd.stat().st_mtime_ns
    again = tinyguest.build(CACHE_DIR, log=messages.append)
    assert again == guest
    assert tinyguest.cached(CACHE_DIR) == guest
    assert again.initrd.stat().st_mtime_ns == before
    assert not any("download" in message for message in messages)


def test_it_reports_a_cache_missing_a_file_as_not_cached(guest: TinyGuest, tmp_path: Path) -> None:
    copy = tmp_path / "tinyguest"
    shutil.copytree(guest.kernel.parent, copy)
    assert tinyguest.cached(tmp_path) is not None
    (copy / "pxe" / "pxelinux.0").unlink()
    assert tinyguest.cached(tmp_path) is None


def test_it_reports_a_cache_from_another_recipe_as_not_cached(
    guest: TinyGuest, tmp_path: Path
) -> None:
    copy = tmp_path / "tinyguest"
    shutil.copytree(guest.kernel.parent, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "recipe": "older"}))
    assert tinyguest.cached(tmp_path) is None


def test_it_leaves_no_build_leftovers_in_the_cache_dir(guest: TinyGuest) -> None:
    leftovers = [p.name for p in CACHE_DIR.iterdir() if p.name.startswith(".tinyguest-")]
    assert leftovers == []


def _fake_build_into(content: bytes, fail: bool = False) -> Callable[..., str]:
    """Stand-in for the real build steps, writing every artifact (or failing half-way)."""

    def build_into(out: Path, work: Path, log: Callable[[str], None]) -> str:
        (out / "vmlinux").write_bytes(content)
        if fail:
            raise BuildError("iso: xorriso", "simulated crash")
        for name in ["vmlinuz", "initrd.img", "initrd-runtime.img", "boot.img", "tinyguest.iso"]:
            (out / name).write_bytes(content)
        (out / "pxe" / "pxelinux.cfg").mkdir(parents=True)
        for name in ["pxelinux.0", "ldlinux.c32", "pxelinux.cfg/default", "vmlinuz", "initrd.img"]:
            (out / "pxe" / name).write_bytes(content)
        return "9.9.9-fake"

    return build_into


def test_it_leaves_no_half_cache_when_a_build_step_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tinyguest, "_build_into", _fake_build_into(b"half", fail=True))
    with pytest.raises(BuildError, match="simulated crash"):
        tinyguest.build(tmp_path, log=lambda _: None)
    assert tinyguest.cached(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tinyguest.lock"]


def test_it_replaces_the_cache_when_forced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tinyguest, "_build_into", _fake_build_into(b"old"))
    old = tinyguest.build(tmp_path, log=lambda _: None)
    monkeypatch.setattr(tinyguest, "_build_into", _fake_build_into(b"new"))
    assert tinyguest.build(tmp_path, log=lambda _: None).kernel.read_bytes() == b"old"
    new = tinyguest.build(tmp_path, force=True, log=lambda _: None)
    assert new == old
    assert new.kernel.read_bytes() == b"new"
    assert new.kernel_version == "9.9.9-fake"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tinyguest.lock", "tinyguest"]


def test_the_direct_boot_kernel_is_the_bzimages_own_elf_kernel_with_a_pvh_entry(
    guest: TinyGuest,
) -> None:
    bzimage = (guest.kernel.parent / "vmlinuz").read_bytes()

    elf = guest.kernel.read_bytes()

    assert bzimage[0x202:0x206] == b"HdrS" and elf[:4] == b"\x7fELF"
    assert tinyguest._has_pvh_entry(elf)
    assert tinyguest.direct_boot_kernel(bzimage) == elf
    assert len(elf) > len(bzimage)  # decompressed: nothing left to unpack under emulation


def test_a_bzimage_without_a_payload_it_can_unpack_is_kept_as_it_is() -> None:
    header = bytearray(0x400)
    header[0x1F1] = 1  # one setup sector: the payload starts at 1024
    header[0x202:0x206] = b"HdrS"
    header[0x248:0x250] = (0).to_bytes(4, "little") + (8).to_bytes(4, "little")
    unknown = bytes(header) + b"\x28\xb5\x2f\xfdzstd"  # a zstd payload

    assert tinyguest.direct_boot_kernel(unknown) == unknown
    with pytest.raises(BuildError, match="not a bzImage"):
        tinyguest.direct_boot_kernel(b"\x7fELF" + bytes(0x300))


def test_it_makes_the_artifacts_readable_by_other_users(guest: TinyGuest) -> None:
    for path in [guest.kernel, guest.initrd, guest.iso, guest.pxe_root / "pxelinux.0"]:
        assert path.stat().st_mode & 0o004
    assert guest.pxe_root.stat().st_mode & 0o005 == 0o005


def _cpio_archives(archive: bytes) -> list[dict[str, bytes]]:
    """Entries of each of several concatenated newc archives (read independently of the writer)."""
    archives: list[dict[str, bytes]] = [{}]
    pos = 0
    while pos + 110 <= len(archive):
        if archive[pos : pos + 4] == b"\0\0\0\0":  # padding between archives
            pos += 4
            continue
        assert archive[pos : pos + 6] == b"070701"
        filesize = int(archive[pos + 54 : pos + 62], 16)
        namesize = int(archive[pos + 94 : pos + 102], 16)
        name = archive[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        data = archive[pos : pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            archives.append({})
        else:
            archives[-1][name] = data
    return [entries for entries in archives if entries]


MODULES = ["virtio_ring", "virtio", "virtio_pci", "virtio_blk", "button", "evdev"]


def test_it_puts_init_busybox_and_the_modules_in_the_runtime_initramfs(guest: TinyGuest) -> None:
    # cpio(1) lists the archive, so our own writer is checked by an independent reader.
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"],
        input=gzip.decompress(guest.runtime_initrd.read_bytes()),
        capture_output=True,
        check=True,
    ).stdout.decode()
    names = set(listing.split())
    assert {"init", "bin/busybox", "bin/sh", "dev/console", "lib/modules/order"} <= names
    assert {f"lib/modules/{m}.ko" for m in MODULES} <= names


def test_it_loads_the_modules_after_their_dependencies(guest: TinyGuest) -> None:
    (runtime,) = _cpio_archives(gzip.decompress(guest.runtime_initrd.read_bytes()))
    order = runtime["lib/modules/order"].decode().split()
    for module in MODULES:
        assert module in order
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_pci")
    assert order.index("virtio_pci_modern_dev") < order.index("virtio_pci")
    assert order.index("virtio") < order.index("virtio_blk")


def test_it_appends_the_boot_image_to_the_installer_initramfs(guest: TinyGuest) -> None:
    runtime, extra = _cpio_archives(gzip.decompress(guest.initrd.read_bytes()))
    assert "init" in runtime
    assert list(extra) == ["boot.img"]
    assert extra["boot.img"] == guest.boot_image.read_bytes()
    assert guest.initrd.read_bytes().startswith(guest.runtime_initrd.read_bytes())


def test_it_makes_a_boot_image_that_fits_before_the_marker(guest: TinyGuest) -> None:
    size = guest.boot_image.stat().st_size
    assert size < MARKER_OFFSET_MIB * 1024 * 1024 < DISK_MIN_MIB * 1024 * 1024
    assert guest.boot_image.read_bytes()[510:512] == b"\x55\xaa"
    listing = subprocess.run(
        ["mdir", "-a", "-b", "-i", str(guest.boot_image), "::"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    ).stdout.upper()
    for name in ["VMLINUZ", "INITRD.IMG", "SYSLINUX.CFG", "LDLINUX.SYS", "LDLINUX.C32"]:
        assert name in listing


def test_it_points_the_iso_and_pxe_menus_at_the_installer(guest: TinyGuest, tmp_path: Path) -> None:
    # xorriso made the ISO (setup installs it); it reads a file back out as well.
    extracted = tmp_path / "isolinux.cfg"
    argv = ["xorriso", "-osirrox", "on", "-indev", str(guest.iso)]
    argv += ["-extract", "/isolinux/isolinux.cfg", str(extracted)]
    subprocess.run(argv, capture_output=True, check=True)
    iso_cfg = extracted.read_text()
    assert install_cmdline("cdrom") in iso_cfg
    pxe_cfg = (guest.pxe_root / "pxelinux.cfg" / "default").read_text()
    assert install_cmdline("pxe") in pxe_cfg
    for name in ["pxelinux.0", "ldlinux.c32", "vmlinuz", "initrd.img"]:
        assert (guest.pxe_root / name).is_file()
    assert (guest.pxe_root / "initrd.img").read_bytes() == guest.initrd.read_bytes()


# --- real boots under QEMU --------------------------------------------------------------------


class Qemu:
    """One qemu-system-x86_64 run under TCG with its serial console in a file and a QMP socket."""

    def __init__(self, workdir: Path, name: str, args: Sequence[str]) -> None:
        self.console = workdir / f"{name}.console"
        self.qmp_path = workdir / f"{name}.qmp"
        argv = [
            QEMU, "-machine", "pc,accel=tcg", "-m", "256", "-nodefaults", "-display", "none",
            "-no-reboot", "-serial", f"file:{self.console}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *args,
        ]  # fmt: skip
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    def text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def report(self) -> ConsoleReport:
        return parse_console(self.text())

    def wait_for(self, what: str, ok: Callable[[ConsoleReport], bool]) -> float:
        """Poll the console until ok(report); return seconds since start."""
        deadline = self.started + DEADLINE
        while time.monotonic() < deadline:
            if ok(self.report()):
                return time.monotonic() - self.started
            if self.proc.poll() is not None and not ok(self.report()):
                pytest.fail(f"QEMU exited ({self.proc.returncode}) before {what}:\n{self.tail()}")
            time.sleep(0.2)
        pytest.fail(f"no {what} within {DEADLINE} s:\n{self.tail()}")

    def wait_exit(self, what: str, since: float | None = None) -> float:
        """Wait for QEMU to exit by itself; return seconds since `since` (default: start)."""
        start = self.started if since is None else since
        try:
            self.proc.wait(timeout=max(0.0, start + DEADLINE - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"QEMU did not exit ({what}) within {DEADLINE} s:\n{self.tail()}")
        output = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
        assert self.proc.returncode == 0, output
        return time.monotonic() - start

    def powerdown(self) -> float:
        """Press the ACPI power button through QMP; return the monotonic time of the press."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.qmp_path))
            stream = sock.makefile("rw")
            assert "QMP" in json.loads(stream.readline())
            for command in ("qmp_capabilities", "system_powerdown"):
                stream.write(json.dumps({"execute": command}) + "\n")
                stream.flush()
                while True:  # skip asynchronous events until the command's answer
                    answer = json.loads(stream.readline())
                    if "return" in answer or "error" in answer:
                        break
                assert "return" in answer, answer
        return time.monotonic()

    def tail(self) -> str:
        return "\n".join(self.text().splitlines()[-25:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short path under /tmp: a unix socket path must stay under 108 bytes.
    with tempfile.TemporaryDirectory(prefix="tg-") as path:
        yield Path(path)


@pytest.fixture
def run_qemu(workdir: Path) -> Iterator[Callable[..., Qemu]]:
    started: list[Qemu] = []

    def run(name: str, *args: str) -> Qemu:
        qemu = Qemu(workdir, name, args)
        started.append(qemu)
        return qemu

    yield run
    for qemu in started:
        qemu.stop()


def _blank_disk(workdir: Path, mib: int = DISK_MIN_MIB) -> list[str]:
    disk = workdir / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), f"{mib}M"], check=True, timeout=30
    )
    return ["-drive", f"file={disk},format=qcow2,if=virtio"]


def _boot_disk_and_power_off(run_qemu: Callable[..., Qemu], media: list[str], expect: str) -> None:
    """Boot from the disk (BIOS), check the marker, then shut down with the power button."""
    qemu = run_qemu(f"disk-{expect}", *media)
    ready = qemu.wait_for("VMPORTAL-READY", lambda r: r.ready)
    assert qemu.report().disk_marker == expect
    # Staying up means ALIVE lines keep coming after READY.
    qemu.wait_for("VMPORTAL-ALIVE", lambda r: r.alive_count >= 1)
    pressed = qemu.powerdown()
    stopped = qemu.wait_exit("after system_powerdown", since=pressed)
    assert qemu.report().powering_off
    print(
        f"TIMING {expect}: disk boot to READY {ready:.1f} s, power button to exit {stopped:.2f} s"
    )


@pytest.mark.qemu
@needs_qemu
def test_it_installs_by_direct_kernel_boot_then_boots_the_disk_and_obeys_the_power_button(
    guest: TinyGuest, workdir: Path, run_qemu: Callable[..., Qemu]
) -> None:
    disk = _blank_disk(workdir)
    kernel = ["-kernel", str(guest.kernel), "-initrd", str(guest.initrd)]
    installer = run_qemu("install", *disk, *kernel, "-append", install_cmdline("t1"))
    installed = installer.wait_exit("after install")
    assert installer.report().installed_marker == "t1"
    print(f"TIMING direct-kernel install {installed:.1f} s")

    _boot_disk_and_power_off(run_qemu, disk, "t1")


@pytest.mark.qemu
@needs_qemu
def test_it_installs_from_the_iso_when_the_disk_is_blank(
    guest: TinyGuest, workdir: Path, run_qemu: Callable[..., Qemu]
) -> None:
    # Boot order disk, then CD: the blank disk falls through to the CD, the installed one boots.
    media = [
        *_blank_disk(workdir),
        "-drive", f"file={guest.iso},media=cdrom,if=ide,readonly=on",
        "-boot", "order=cd",
    ]  # fmt: skip
    installer = run_qemu("iso-install", *media)
    installed = installer.wait_exit("after ISO install")
    assert installer.report().installed_marker == "cdrom"
    print(f"TIMING ISO install {installed:.1f} s")

    _boot_disk_and_power_off(run_qemu, media, "cdrom")


@pytest.mark.qemu
@needs_qemu
def test_it_installs_over_pxe_when_the_disk_is_blank(
    guest: TinyGuest, workdir: Path, run_qemu: Callable[..., Qemu]
) -> None:
    media = [
        *_blank_disk(workdir),
        "-netdev", f"user,id=n0,tftp={guest.pxe_root},bootfile=pxelinux.0",
        "-device", "virtio-net-pci,netdev=n0",
        "-boot", "order=cn",
    ]  # fmt: skip
    installer = run_qemu("pxe-install", *media)
    installed = installer.wait_exit("after PXE install")
    assert installer.report().installed_marker == "pxe"
    print(f"TIMING PXE install {installed:.1f} s")

    _boot_disk_and_power_off(run_qemu, media, "pxe")


@pytest.mark.qemu
@needs_qemu
def test_it_reports_a_blank_disk_when_the_runtime_boots_without_an_install(
    guest: TinyGuest, workdir: Path, run_qemu: Callable[..., Qemu]
) -> None:
    qemu = run_qemu(
        "runtime",
        *_blank_disk(workdir),
        "-kernel", str(guest.kernel), "-initrd", str(guest.runtime_initrd),
        "-append", runtime_cmdline(),
    )  # fmt: skip
    qemu.wait_for("VMPORTAL-READY", lambda r: r.ready)
    assert qemu.report().disk_marker == tinyguest.NO_MARKER


@pytest.mark.qemu
@needs_qemu
def test_it_refuses_a_too_small_disk_and_stays_up_instead_of_powering_off(
    guest: TinyGuest, workdir: Path, run_qemu: Callable[..., Qemu]
) -> None:
    qemu = run_qemu(
        "small",
        *_blank_disk(workdir, mib=DISK_MIN_MIB // 2),
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
        "-append", install_cmdline("small"),
    )  # fmt: skip
    qemu.wait_for("VMPORTAL-INSTALL-FAILED", lambda r: r.install_error is not None)
    assert qemu.report().install_error == "disk-too-small"
    assert qemu.report().installed_marker is None
    # A power-off would read as "install finished" to the portal, so the guest must stay up.
    with pytest.raises(subprocess.TimeoutExpired):
        qemu.proc.wait(timeout=3)
