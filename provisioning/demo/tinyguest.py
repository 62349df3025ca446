"""Build a tiny real guest: Debian kernel + busybox initramfs that installs itself onto /dev/vda.

The same initramfs runs in two modes chosen by the kernel command line:

* INSTALLER (``vmportal.install=1``): writes a BIOS-bootable FAT "superfloppy" image onto
  /dev/vda, stamps ``VMPORTAL-MARKER <token>`` at ``MARKER_OFFSET_MIB`` and powers off.
  With a second disk (/dev/vdb, a data disk) that carries no ``VMPORTAL-DATA <token>`` stamp
  yet, it stamps one with the same token first: a data disk kept across a reinstall keeps the
  token of the install that first saw it.
* RUNTIME (anything else): reads the marker back, prints ``VMPORTAL-DISK: <token>`` (and
  ``VMPORTAL-DATA: <token>`` when it has a data disk) and ``VMPORTAL-READY``, then prints
  ``VMPORTAL-ALIVE <uptime>`` every few seconds until the ACPI power button is pressed, when it
  syncs and powers off. Meanwhile a shell runs on the serial console (ttyS0) and one on the
  screen (tty1), so a console viewer can type.

Artifacts (kernel, initramfs pair, boot image, ISO, PXE TFTP root) are cached in a directory
and rebuilt only when missing or when the recipe changed. The kernel for direct kernel boot is
the bzImage's own ELF kernel, decompressed, which QEMU starts at its PVH entry point: under
software emulation the bzImage's XZ decompression alone took 8 of an install's 14 seconds. The
boot image, the ISO and the PXE root (bootloaders) keep the bzImage. Stdlib only; shells out to
Debian tools.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Debian packages the builder shells out to or copies files from.
REQUIRED_DEBIAN_PACKAGES: tuple[str, ...] = (
    "apt",
    "dpkg",
    "busybox-static",
    "dosfstools",
    "mtools",
    "syslinux",
    "syslinux-common",
    "isolinux",
    "pxelinux",
    "xorriso",
)
# Extra packages the QEMU smoke tests need (cpio lists archives independently of our writer).
TEST_DEBIAN_PACKAGES: tuple[str, ...] = ("qemu-system-x86", "qemu-utils", "ipxe-qemu", "cpio")

DISK_MIN_MIB = 64
MARKER_OFFSET_MIB = 48
# Where the installer keeps the answer file it fetched (vmportal.answer_url=), for the runtime
# to print between VMPORTAL-ANSWER-BEGIN and -END: 1 MiB after the marker, at most 1 MiB.
ANSWER_OFFSET_MIB = 49
ANSWER_MAX_BYTES = 1024 * 1024
# The installer unpacks the boot image into RAM; measured: 128 MiB works, 96 MiB panics (OOM).
MEMORY_MIN_MIB = 128

KERNEL_META_PACKAGE = "linux-image-amd64"
# Loaded in dependency order; dependencies found in the modules' .modinfo are added.
REQUIRED_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    # The ACPI power button reports through an input device that the guest reads via evdev.
    "button",
    "evdev",
)
# virtio_net for answer files fetched over the network; the IDE CD-ROM and ISO 9660 for answer
# files on an OEMDRV CD-ROM.
OPTIONAL_MODULES: tuple[str, ...] = ("virtio_net", "ata_piix", "sr_mod", "isofs")

MARKER_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Printed by the guest when the disk carries no marker, so it cannot be a marker itself.
NO_MARKER = "none"

# Bump when the shape of the cache changes in a way the recipe text does not show.
_RECIPE_VERSION = 1
_CACHE_NAME = "tinyguest"
_MANIFEST = "manifest.json"
_SECTOR = 512

_INIT_SCRIPT = r"""#!/bin/sh
# PID 1 of the vmportal tiny guest. INSTALLER or RUNTIME mode, chosen by the kernel command line.
PATH=/bin
export PATH
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp
# Kernel chatter would interleave with the lines the host parses; keep errors only.
dmesg -n 4

DISK=/dev/vda
DATA=/dev/vdb
MARKER_SECTOR=@MARKER_SECTOR@
ANSWER_SECTOR=@ANSWER_SECTOR@
ANSWER_MAX=@ANSWER_MAX@
DISK_MIN_BYTES=@DISK_MIN_BYTES@

install=0
marker=installed
answer_url=""
answer_oemdrv=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmportal.install=1) install=1 ;;
        vmportal.marker=*) marker="${arg#vmportal.marker=}" ;;
        vmportal.answer_url=*) answer_url="${arg#vmportal.answer_url=}" ;;
        vmportal.answer=oemdrv) answer_oemdrv=1 ;;
    esac
done

valid_token() {
    case "$1" in
        '' | *[!A-Za-z0-9._-]*) return 1 ;;
    esac
    [ "${#1}" -le 64 ]
}

load_modules() {
    # No modules.dep here: retry failures in a few passes in case the order is off.
    pending=$(cat /lib/modules/order)
    for pass in 1 2 3 4; do
        left=""
        for m in $pending; do
            insmod "/lib/modules/$m.ko" 2>/dev/null || left="$left $m"
        done
        pending=$left
        [ -z "$pending" ] && return 0
    done
    echo "VMPORTAL-WARN modules not loaded:$pending"
}

virtio_disks() {
    # virtio devices of type 2 are block devices; each becomes a /dev/vdX once probed.
    n=0
    for d in /sys/bus/virtio/devices/*; do
        [ "$(cat "$d/device" 2>/dev/null)" = 0x0002 ] && n=$((n + 1))
    done
    echo "$n"
}

wait_for_disk() {
    # virtio-blk probes asynchronously after insmod returns: wait for every disk's node.
    want=$(virtio_disks)
    i=0
    while :; do
        have=0
        for b in /dev/vd?; do [ -b "$b" ] && have=$((have + 1)); done
        [ "$have" -ge "$want" ] && [ -b "$DISK" ] && return 0
        i=$((i + 1))
        [ "$i" -gt 100 ] && { [ -b "$DISK" ]; return; }
        sleep 0.1
    done
}

data_token() {
    # The token stamped on the data disk, or nothing.
    line=$(dd if="$DATA" bs=512 count=1 2>/dev/null | tr -d '\000' | head -n 1)
    case "$line" in
        "VMPORTAL-DATA "*)
            t="${line#VMPORTAL-DATA }"
            valid_token "$t" && echo "$t"
            ;;
    esac
}

network_up() {
    # DHCP on the first network interface that gets a lease (virtio_net is loaded).
    cat >/tmp/udhcpc.script <<'SCRIPT'
#!/bin/sh
case "$1" in
    bound|renew) ip addr add "$ip/${mask:-24}" dev "$interface" ;;
esac
SCRIPT
    chmod 755 /tmp/udhcpc.script
    ip link set lo up
    for dev in /sys/class/net/*; do
        name=${dev##*/}
        [ "$name" = lo ] && continue
        ip link set "$name" up
        udhcpc -i "$name" -s /tmp/udhcpc.script -q -n -t 20 -T 1 >/dev/null 2>&1 && return 0
    done
    return 1
}

keep_answer() {
    # The answer file in /tmp/answer, kept on the disk for the runtime to print.
    size=$(wc -c </tmp/answer)
    [ "$size" -le "$ANSWER_MAX" ] || install_fail answer-too-big
    { printf 'VMPORTAL-ANSWER %s\n' "$size"; cat /tmp/answer; } >/tmp/answer.disk
    dd if=/tmp/answer.disk of="$DISK" bs=512 seek="$ANSWER_SECTOR" conv=notrunc,fsync \
        2>/dev/null || install_fail write-answer
    echo "VMPORTAL-ANSWER-$1 $size"
}

fetch_answer() {
    # The answer file the portal rendered for this guest, from its one-time URL.
    network_up || install_fail no-network
    wget -q -O /tmp/answer "$answer_url" || install_fail answer-fetch
    keep_answer FETCHED
}

read_oemdrv() {
    # The answer file on the CD-ROM labelled OEMDRV (ks.cfg on it), as Anaconda reads it.
    mkdir -p /mnt
    i=0
    while :; do
        for cd in /dev/sr*; do
            [ -b "$cd" ] || continue
            if mount -t iso9660 -o ro "$cd" /mnt 2>/dev/null; then
                if [ -f /mnt/ks.cfg ]; then
                    cp /mnt/ks.cfg /tmp/answer
                    umount /mnt
                    keep_answer OEMDRV
                    return 0
                fi
                umount /mnt
            fi
        done
        i=$((i + 1))
        [ "$i" -gt 100 ] && install_fail no-oemdrv
        sleep 0.1
    done
}

print_answer() {
    # Between BEGIN and END lines, the answer file the installer fetched (if it fetched one).
    head=$(dd if="$DISK" bs=512 skip="$ANSWER_SECTOR" count=1 2>/dev/null | head -n 1)
    case "$head" in
        "VMPORTAL-ANSWER "*) ;;
        *) return 0 ;;
    esac
    size=${head#VMPORTAL-ANSWER }
    echo "VMPORTAL-ANSWER-BEGIN"
    dd if="$DISK" bs=512 skip="$ANSWER_SECTOR" count=$((ANSWER_MAX / 512 + 1)) 2>/dev/null \
        | tail -c +$((${#head} + 2)) | head -c "$size"
    echo
    echo "VMPORTAL-ANSWER-END"
}

stay_up() {
    # PID 1 must never exit; a failed install waits here for the host's deadline.
    while :; do sleep 3600; done
}

install_fail() {
    echo "VMPORTAL-INSTALL-FAILED $*"
    stay_up
}

do_install() {
    valid_token "$marker" || install_fail bad-marker
    wait_for_disk || install_fail no-disk
    size=$(blockdev --getsize64 "$DISK")
    [ "$size" -ge "$DISK_MIN_BYTES" ] || install_fail disk-too-small
    dd if=/boot.img of="$DISK" bs=1M conv=fsync 2>/dev/null || install_fail write-image
    if [ -n "$answer_url" ]; then
        fetch_answer
    elif [ "$answer_oemdrv" = 1 ]; then
        read_oemdrv
    fi
    { printf 'VMPORTAL-MARKER %s\n' "$marker"; head -c 512 /dev/zero; } | head -c 512 >/tmp/marker
    dd if=/tmp/marker of="$DISK" bs=512 seek="$MARKER_SECTOR" count=1 conv=notrunc,fsync \
        2>/dev/null || install_fail write-marker
    if [ -b "$DATA" ] && [ -z "$(data_token)" ]; then
        { printf 'VMPORTAL-DATA %s\n' "$marker"; head -c 512 /dev/zero; } | head -c 512 >/tmp/data
        dd if=/tmp/data of="$DATA" bs=512 count=1 conv=notrunc,fsync 2>/dev/null \
            || install_fail write-data
    fi
    sync
    echo "VMPORTAL-INSTALL-DONE $marker"
    poweroff -f
    stay_up
}

arm_power_button() {
    # Open every "Power Button" event device before READY, so no press after READY is lost.
    fd=3
    for d in /sys/class/input/input*; do
        [ "$(cat "$d/name" 2>/dev/null)" = "Power Button" ] || continue
        for e in "$d"/event*; do
            [ -e "$e" ] || continue
            [ "$fd" -gt 9 ] && continue
            eval "exec $fd</dev/input/${e##*/}" || continue
            # One struct input_event is 24 bytes on x86_64; any key event means a press.
            (
                if dd bs=24 count=1 <&"$fd" >/dev/null 2>&1; then
                    echo "VMPORTAL-POWERDOWN"
                    sync
                    poweroff -f
                fi
            ) &
            eval "exec $fd<&-"
            fd=$((fd + 1))
        done
    done
    [ "$fd" -gt 3 ] || echo "VMPORTAL-WARN no power button"
}

do_runtime() {
    token=none
    if wait_for_disk; then
        line=$(dd if="$DISK" bs=512 skip="$MARKER_SECTOR" count=1 2>/dev/null \
            | tr -d '\000' | head -n 1)
        case "$line" in
            "VMPORTAL-MARKER "*)
                t="${line#VMPORTAL-MARKER }"
                valid_token "$t" && token="$t"
                ;;
        esac
    fi
    echo "VMPORTAL-DISK: $token"
    print_answer
    if [ -b "$DATA" ]; then
        data=$(data_token)
        echo "VMPORTAL-DATA: ${data:-none}"
    fi
    arm_power_button
    echo "VMPORTAL-READY"
    (
        while :; do
            read -r up idle </proc/uptime
            echo "VMPORTAL-ALIVE $up"
            sleep 5
        done
    ) &
    # A shell on the screen (tty1) and one on the serial console, each started again on exit;
    # setsid makes each tty its shell's controlling terminal, so Ctrl-C and job control work.
    export PS1='tiny:$PWD# '
    if [ -c /dev/tty1 ]; then
        (
            while :; do
                printf 'vmportal tiny guest (disk: %s)\n' "$token" >/dev/tty1
                setsid sh -c 'exec sh -i </dev/tty1 >/dev/tty1 2>&1'
                sleep 1
            done
        ) &
    fi
    while :; do
        setsid sh -c 'exec sh -i </dev/ttyS0 >/dev/ttyS0 2>&1'
        sleep 1
    done
}

load_modules
if [ "$install" = 1 ]; then
    do_install
else
    do_runtime
fi
"""

_BOOTLOADER_CFG = """SERIAL 0 115200
DEFAULT vmportal
PROMPT 0
TIMEOUT 0
LABEL vmportal
  KERNEL {kernel}
  INITRD {initrd}
  APPEND {append}
"""


class BuildError(RuntimeError):
    """A build step failed; the message names the step and the tool's stderr tail."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"tiny guest build failed at {step}: {detail}")
        self.step = step
        self.detail = detail


@dataclass(frozen=True)
class TinyGuest:
    """Paths of the built artifacts; all live in one cache folder."""

    kernel: Path
    initrd: Path  # INSTALLER initramfs; runs as RUNTIME without vmportal.install=1
    runtime_initrd: Path
    boot_image: Path
    iso: Path
    pxe_root: Path
    kernel_version: str


@dataclass(frozen=True)
class ConsoleReport:
    """What the guest's serial console said so far."""

    installed_marker: str | None
    disk_marker: str | None  # NO_MARKER ("none") when the disk carries no marker
    ready: bool
    alive_count: int
    install_error: str | None = None
    powering_off: bool = False
    data_marker: str | None = None  # the data disk's stamp; None without a data disk


def validate_marker(marker: str) -> str:
    """Return marker if it is safe on a kernel command line, else raise ValueError."""
    if not isinstance(marker, str) or not MARKER_RE.fullmatch(marker):
        raise ValueError(f"marker must match [A-Za-z0-9._-]{{1,64}}: {marker!r}")
    if marker == NO_MARKER:
        raise ValueError(f"marker {NO_MARKER!r} is reserved for a disk without a marker")
    return marker


def install_cmdline(marker: str) -> str:
    """Kernel command line that installs the guest onto /dev/vda with this marker."""
    return f"console=ttyS0 vmportal.install=1 vmportal.marker={validate_marker(marker)}"


def runtime_cmdline() -> str:
    """Kernel command line of the installed guest."""
    return "console=ttyS0"


_INSTALL_DONE_RE = re.compile(r"VMPORTAL-INSTALL-DONE ([A-Za-z0-9._-]+)")
_INSTALL_FAILED_RE = re.compile(r"VMPORTAL-INSTALL-FAILED (\S+)")
_DISK_RE = re.compile(r"VMPORTAL-DISK: ([A-Za-z0-9._-]+)")
_DATA_RE = re.compile(r"VMPORTAL-DATA: ([A-Za-z0-9._-]+)")


def parse_console(text: str) -> ConsoleReport:
    """Read the guest's progress lines out of serial console text (kernel noise is ignored)."""
    installed = _INSTALL_DONE_RE.findall(text)
    failed = _INSTALL_FAILED_RE.findall(text)
    disk = _DISK_RE.findall(text)
    data = _DATA_RE.findall(text)
    return ConsoleReport(
        installed_marker=installed[-1] if installed else None,
        disk_marker=disk[-1] if disk else None,
        data_marker=data[-1] if data else None,
        ready="VMPORTAL-READY" in text,
        alive_count=len(re.findall(r"VMPORTAL-ALIVE \d", text)),
        install_error=failed[-1] if failed else None,
        powering_off="VMPORTAL-POWERDOWN" in text,
    )


# --- cache ------------------------------------------------------------------------------------

_FILES = {
    "kernel": "vmlinux",
    "bzimage": "vmlinuz",
    "initrd": "initrd.img",
    "runtime_initrd": "initrd-runtime.img",
    "boot_image": "boot.img",
    "iso": "tinyguest.iso",
}
_PXE_DIR = "pxe"
_PXE_FILES = ("pxelinux.0", "ldlinux.c32", "pxelinux.cfg/default", "vmlinuz", "initrd.img")


def _recipe_hash() -> str:
    """Hash of everything that shapes the artifacts, so a changed recipe invalidates the cache."""
    parts = [
        str(_RECIPE_VERSION),
        _INIT_SCRIPT,
        _BOOTLOADER_CFG,
        repr(REQUIRED_MODULES),
        repr(OPTIONAL_MODULES),
        str(MARKER_OFFSET_MIB),
        str(DISK_MIN_MIB),
        install_cmdline("x"),
        runtime_cmdline(),
        # The builder's own code too: the cache is shared by every checkout on the machine
        # (settings.DEMO_DIR), and must not outlive a change to how it is built.
        Path(__file__).read_text(),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _guest_at(root: Path, kernel_version: str) -> TinyGuest:
    return TinyGuest(
        kernel=root / _FILES["kernel"],
        initrd=root / _FILES["initrd"],
        runtime_initrd=root / _FILES["runtime_initrd"],
        boot_image=root / _FILES["boot_image"],
        iso=root / _FILES["iso"],
        pxe_root=root / _PXE_DIR,
        kernel_version=kernel_version,
    )


def cached(cache_dir: Path) -> TinyGuest | None:
    """The cached guest if it is complete and built by the current recipe, else None."""
    root = Path(cache_dir) / _CACHE_NAME
    try:
        manifest = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("recipe") != _recipe_hash():
        return None
    version = manifest.get("kernel_version")
    if not isinstance(version, str) or not version:
        return None
    wanted = [root / name for name in _FILES.values()]
    wanted += [root / _PXE_DIR / name for name in _PXE_FILES]
    if not all(path.is_file() and path.stat().st_size > 0 for path in wanted):
        return None
    return _guest_at(root, version)


def build(cache_dir: Path, *, force: bool = False, log: Callable[[str], None] = print) -> TinyGuest:
    """Return the cached guest, building it first when missing, stale or forced."""
    cache_dir = Path(cache_dir)
    if not force and (guest := cached(cache_dir)) is not None:
        return guest
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f".{_CACHE_NAME}.lock"):
        # Another process may have finished the build while we waited for the lock.
        if not force and (guest := cached(cache_dir)) is not None:
            return guest
        for stale in cache_dir.glob(f".{_CACHE_NAME}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{_CACHE_NAME}-build-", dir=cache_dir))
        try:
            out = work / "out"
            out.mkdir()
            version = _build_into(out, work, log)
            _write_manifest(out, version)
            _make_readable(out)
            final = cache_dir / _CACHE_NAME
            if final.exists():
                final.rename(work / "previous")
            out.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    guest = cached(cache_dir)
    if guest is None:
        raise BuildError("cache check", f"{cache_dir / _CACHE_NAME} incomplete after build")
    log(f"tiny guest ready in {guest.kernel.parent} (kernel {guest.kernel_version})")
    return guest


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def recipe_hash() -> str:
    """The hash of everything that shapes the artifacts (a new one means a new build)."""
    return _recipe_hash()


def _write_manifest(out: Path, version: str) -> None:
    manifest = {"recipe": _recipe_hash(), "kernel_version": version}
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _make_readable(root: Path) -> None:
    # QEMU (libvirt-qemu) and dnsmasq read these files as other users.
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


# --- build steps ------------------------------------------------------------------------------


def _build_into(out: Path, work: Path, log: Callable[[str], None]) -> str:
    """Build every artifact into out (scratch space in work); return the kernel version."""
    log("tiny guest: downloading the kernel package")
    deb = _download_kernel(work / "deb")
    log(f"tiny guest: extracting {deb.name}")
    tree = work / "kernel-tree"
    _run("extract kernel package", ["dpkg-deb", "-x", str(deb), str(tree)])
    deb.unlink()
    vmlinuz, version = _find_kernel(tree)
    modules = _collect_modules(tree / "lib" / "modules" / version, log)
    bzimage = vmlinuz.read_bytes()
    shutil.rmtree(tree)
    (out / _FILES["bzimage"]).write_bytes(bzimage)
    log("tiny guest: unpacking the kernel for direct (PVH) boot")
    (out / _FILES["kernel"]).write_bytes(direct_boot_kernel(bzimage))

    log("tiny guest: writing the runtime initramfs")
    runtime = _runtime_initramfs(modules)
    (out / _FILES["runtime_initrd"]).write_bytes(runtime)

    log("tiny guest: making the bootable disk image")
    boot_image = out / _FILES["boot_image"]
    _make_boot_image(boot_image, out / _FILES["bzimage"], out / _FILES["runtime_initrd"], work)

    log("tiny guest: writing the installer initramfs")
    extra = _Cpio()
    extra.add_file("boot.img", boot_image.read_bytes(), 0o644)
    installer = runtime + gzip.compress(extra.finish(), compresslevel=6, mtime=0)
    (out / _FILES["initrd"]).write_bytes(installer)

    log("tiny guest: making the installer ISO")
    _make_iso(out / _FILES["iso"], out / _FILES["bzimage"], out / _FILES["initrd"], work)
    log("tiny guest: making the PXE TFTP root")
    _make_pxe_root(out / _PXE_DIR, out / _FILES["bzimage"], out / _FILES["initrd"])
    return version


def _run(step: str, argv: Sequence[str], *, cwd: Path | None = None) -> str:
    """Run a tool; raise BuildError naming the step and the stderr tail when it fails."""
    env = dict(os.environ, LC_ALL="C", MTOOLS_SKIP_CHECK="1")
    try:
        proc = subprocess.run(
            list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
        )
    except FileNotFoundError as exc:
        raise BuildError(step, f"{argv[0]} not found (install {argv[0]}'s package)") from exc
    except subprocess.TimeoutExpired as exc:
        raise BuildError(step, f"{argv[0]} timed out") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise BuildError(step, f"{' '.join(argv)} exited {proc.returncode}: {tail}")
    return proc.stdout


# x86 boot protocol (Documentation/arch/x86/boot.rst): offsets into a bzImage's setup header;
# payload_offset and payload_length are two uint32 side by side.
_SETUP_SECTS, _HEADER_MAGIC, _PAYLOAD_OFFSET = 0x1F1, 0x202, 0x248
_XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point's ELF note (Xen's note numbering)


def direct_boot_kernel(bzimage: bytes) -> bytes:
    """The kernel for direct kernel boot: the bzImage's ELF kernel, decompressed, when it has a
    PVH entry point and its payload is XZ or gzip; else the bzImage itself, unchanged."""
    if len(bzimage) < 0x250 or bzimage[_HEADER_MAGIC : _HEADER_MAGIC + 4] != b"HdrS":
        raise BuildError("unpack kernel", "not a bzImage (no HdrS setup header)")
    setup_sects = bzimage[_SETUP_SECTS] or 4
    start = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", bzimage, _PAYLOAD_OFFSET)
    payload = bzimage[start + offset : start + offset + length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            elf = gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
        else:
            return bzimage  # another compression (zstd, lz4, ...): the bootloader path only
    except (lzma.LZMAError, OSError, EOFError):
        return bzimage
    return elf if _has_pvh_entry(elf) else bzimage


def _has_pvh_entry(elf: bytes) -> bool:
    """True for a 64-bit little-endian ELF with the PVH entry note in a PT_NOTE segment."""
    if elf[:6] != b"\x7fELF\x02\x01":
        return False
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", elf, 0x20)[0],
        *struct.unpack_from("<HH", elf, 0x36),
    )
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        at, end = p_offset, p_offset + p_filesz
        while at + 12 <= end:
            namesz, descsz, kind = struct.unpack_from("<III", elf, at)
            name = elf[at + 12 : at + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and kind == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _download_kernel(dest: Path) -> Path:
    """Download the versioned package the kernel meta package depends on."""
    dest.mkdir()
    try:
        depends = _run("resolve kernel package", ["apt-cache", "depends", KERNEL_META_PACKAGE])
    except BuildError:
        # A fresh machine (or one whose apt lists were cleaned) knows no packages yet.
        _run("apt-get update", ["apt-get", "update", "-q"])
        depends = _run("resolve kernel package", ["apt-cache", "depends", KERNEL_META_PACKAGE])
    names = re.findall(r"^\s*Depends:\s*<?(linux-image-[^\s>]+)>?\s*$", depends, re.MULTILINE)
    if not names:
        raise BuildError(
            "resolve kernel package", f"no linux-image dependency in: {depends.strip()!r}"
        )
    # apt warns (harmlessly) when its sandbox user cannot write here; let it write.
    dest.chmod(0o777)
    _run("download kernel package", ["apt-get", "download", names[0]], cwd=dest)
    debs = sorted(dest.glob("*.deb"))
    if len(debs) != 1:
        raise BuildError("download kernel package", f"expected one .deb, found {debs}")
    return debs[0]


def _find_kernel(tree: Path) -> tuple[Path, str]:
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise BuildError("find kernel", f"expected one boot/vmlinuz-*, found {kernels}")
    return kernels[0], kernels[0].name.removeprefix("vmlinuz-")


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".gz", ".zst"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod is not relied on to decompress."""
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".ko.zst"):
        proc = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=False)
        if proc.returncode != 0:
            raise BuildError("decompress module", f"zstd -dc {path}: {proc.stderr[-500:]!r}")
        return proc.stdout
    return path.read_bytes()


def _module_depends(blob: bytes) -> list[str]:
    """The depends= entry of a module's .modinfo section."""
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", blob)
    if not match or not match.group(1):
        return []
    return [name.replace("-", "_") for name in match.group(1).decode().split(",") if name]


def _collect_modules(moddir: Path, log: Callable[[str], None]) -> list[tuple[str, bytes]]:
    """Wanted modules plus their dependencies, in load order, as (name, decompressed bytes)."""
    files = {_module_name(p): p for p in (moddir / "kernel").rglob("*.ko*")}
    builtin_file = moddir / "modules.builtin"
    builtin = set()
    if builtin_file.is_file():
        builtin = {_module_name(Path(line)) for line in builtin_file.read_text().split()}

    blobs: dict[str, bytes] = {}
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...], required: bool) -> bool:
        if name in blobs or name in builtin:
            return True
        if name in chain:
            raise BuildError("collect modules", f"dependency loop: {' -> '.join(chain)}")
        if name not in files:
            if required:
                raise BuildError("collect modules", f"module {name} not found in {moddir}")
            log(f"tiny guest: optional module {name} not available, skipped")
            return False
        blob = _read_module(files[name])
        for dep in _module_depends(blob):
            visit(dep, (*chain, name), True)
        blobs[name] = blob
        order.append(name)
        return True

    for name in REQUIRED_MODULES:
        visit(name, (), True)
    for name in OPTIONAL_MODULES:
        visit(name, (), False)
    return [(name, blobs[name]) for name in order]


def _runtime_initramfs(modules: Iterable[tuple[str, bytes]]) -> bytes:
    """The gzip-compressed busybox initramfs with /init and the modules."""
    busybox = Path("/bin/busybox")
    data = busybox.read_bytes() if busybox.is_file() else b""
    if not data or _elf_is_dynamic(data):
        raise BuildError(
            "initramfs", "/bin/busybox is missing or not static (apt install busybox-static)"
        )
    init = _INIT_SCRIPT.replace("@MARKER_SECTOR@", str(MARKER_OFFSET_MIB * 1024 * 1024 // _SECTOR))
    init = init.replace("@DISK_MIN_BYTES@", str(DISK_MIN_MIB * 1024 * 1024))
    init = init.replace("@ANSWER_SECTOR@", str(ANSWER_OFFSET_MIB * 1024 * 1024 // _SECTOR))
    init = init.replace("@ANSWER_MAX@", str(ANSWER_MAX_BYTES))
    archive = _Cpio()
    for folder in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        archive.add_dir(folder)
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    archive.add_char_device("dev/console", 0o600, 5, 1)
    archive.add_file("bin/busybox", data, 0o755)
    archive.add_symlink("bin/sh", "busybox")
    archive.add_file("init", init.encode(), 0o755)
    names = []
    for name, blob in modules:
        archive.add_file(f"lib/modules/{name}.ko", blob, 0o644)
        names.append(name)
    archive.add_file("lib/modules/order", ("\n".join(names) + "\n").encode(), 0o644)
    return gzip.compress(archive.finish(), compresslevel=9, mtime=0)


def _elf_is_dynamic(data: bytes) -> bool:
    """True when a 64-bit little-endian ELF has a PT_INTERP program header."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError("initramfs", "/bin/busybox is not an x86_64 ELF executable")
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for index in range(phnum):
        start = phoff + index * phentsize
        if int.from_bytes(data[start : start + 4], "little") == 3:  # PT_INTERP
            return True
    return False


def _bootloader_cfg(append: str) -> str:
    return _BOOTLOADER_CFG.format(kernel="/vmlinuz", initrd="/initrd.img", append=append)


def _make_boot_image(image: Path, kernel: Path, initrd: Path, work: Path) -> None:
    """A FAT superfloppy (no partition table) that SeaBIOS boots through syslinux."""
    payload = kernel.stat().st_size + initrd.stat().st_size
    # Room for ldlinux.sys/.c32 (~180 KiB), FAT tables and cluster slack.
    mib = -(-payload // (1024 * 1024)) + 2
    if mib >= MARKER_OFFSET_MIB:
        raise BuildError("boot image", f"{mib} MiB image would overlap the marker")
    cfg = work / "syslinux.cfg"
    cfg.write_text(_bootloader_cfg(runtime_cmdline()))
    _run(
        "boot image: mkfs.vfat",
        [
            "mkfs.vfat",
            "--invariant",
            "--mbr=n",
            "-n",
            "VMPORTAL",
            "-C",
            str(image),
            str(mib * 1024),
        ],
    )
    for source, target in ((kernel, "vmlinuz"), (initrd, "initrd.img"), (cfg, "syslinux.cfg")):
        _run("boot image: mcopy", ["mcopy", "-i", str(image), str(source), f"::{target}"])
    _run("boot image: syslinux --install", ["syslinux", "--install", str(image)])
    listing = _run("boot image: mdir", ["mdir", "-a", "-b", "-i", str(image), "::"])
    if "LDLINUX.C32" not in listing.upper():
        ldlinux = _syslinux_file("ldlinux.c32")
        _run("boot image: mcopy", ["mcopy", "-i", str(image), str(ldlinux), "::ldlinux.c32"])
    sector = image.read_bytes()[:_SECTOR]
    if sector[510:512] != b"\x55\xaa":
        raise BuildError("boot image", "no boot signature after syslinux --install")


def _syslinux_file(name: str) -> Path:
    candidates = [
        Path("/usr/lib/syslinux/modules/bios") / name,
        Path("/usr/lib/ISOLINUX") / name,
        Path("/usr/lib/PXELINUX") / name,
        Path("/usr/share/syslinux") / name,
        Path("/usr/lib/syslinux") / name,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise BuildError("find syslinux file", f"{name} not found (install syslinux-common etc.)")


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _make_iso(iso: Path, kernel: Path, initrd: Path, work: Path) -> None:
    """An El Torito ISO whose default entry installs the guest with marker 'cdrom'."""
    stage = work / "iso"
    (stage / "isolinux").mkdir(parents=True)
    # Copied, not linked: the boot info table is patched into isolinux.bin.
    shutil.copyfile(_syslinux_file("isolinux.bin"), stage / "isolinux" / "isolinux.bin")
    shutil.copyfile(_syslinux_file("ldlinux.c32"), stage / "isolinux" / "ldlinux.c32")
    (stage / "isolinux" / "isolinux.cfg").write_text(_bootloader_cfg(install_cmdline("cdrom")))
    _link_or_copy(kernel, stage / "vmlinuz")
    _link_or_copy(initrd, stage / "initrd.img")
    _run(
        "iso: xorriso",
        [
            "xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso), "-V", "VMPORTAL", "-R",
            "-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat",
            "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table", str(stage),
        ],
    )  # fmt: skip
    shutil.rmtree(stage)


def _make_pxe_root(root: Path, kernel: Path, initrd: Path) -> None:
    """A TFTP root whose pxelinux default entry installs the guest with marker 'pxe'."""
    (root / "pxelinux.cfg").mkdir(parents=True)
    shutil.copyfile(_syslinux_file("pxelinux.0"), root / "pxelinux.0")
    shutil.copyfile(_syslinux_file("ldlinux.c32"), root / "ldlinux.c32")
    cfg = _BOOTLOADER_CFG.format(
        kernel="vmlinuz", initrd="initrd.img", append=install_cmdline("pxe")
    )
    (root / "pxelinux.cfg" / "default").write_text(cfg)
    _link_or_copy(kernel, root / "vmlinuz")
    _link_or_copy(initrd, root / "initrd.img")


# --- cpio (newc) ------------------------------------------------------------------------------


class _Cpio:
    """Writer for the newc cpio format the kernel unpacks; lets us add /dev/console unprivileged."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (
            self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._write_padded(header + encoded)
        self._write_padded(data)

    def _write_padded(self, chunk: bytes) -> None:
        self._out.write(chunk)
        self._out.write(b"\0" * (-len(chunk) % 4))

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def add_file(self, name: str, data: bytes, perm: int) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, perm: int, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive bytes, with the trailer."""
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()
