"""Build a small real Debian 12 cloud image: an ext4 root filesystem, its kernel and initrd.

The guest boots the image's own kernel and initrd directly (no bootloader, no partition table),
with ``CMDLINE``, from a qcow2 overlay of ``base.qcow2``. cloud-init reads its seed only from a
NoCloud volume (``cidata``) and never probes network metadata addresses; without a network
config it falls back to DHCP on the first NIC (ifupdown + dhclient). SSH host keys are made at
first boot, so every guest has its own. The serial console (ttyS0) has a getty, and the QEMU
guest agent starts when its virtio channel appears.

The tree comes from mmdebstrap, fetching from the mirrors in this machine's own apt sources.
Artifacts are cached in a folder and rebuilt only when missing or when the recipe changed.
Stdlib only; shells out to Debian tools (installed with apt-get when missing, as root).

    python -m provisioning.demo.debian /var/cache/vmportal/demo/debian [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
DEFAULT_USER = "debian"  # Debian's cloud-init makes this user (system_info.default_user)
ROOT_LABEL = "root"
CMDLINE = f"root=LABEL={ROOT_LABEL} ro console=ttyS0"
VIRTUAL_SIZE_MIB = 2048
# Debian packages the builder shells out to.
REQUIRED_DEBIAN_PACKAGES: tuple[str, ...] = ("mmdebstrap", "e2fsprogs", "qemu-utils")
# What the image holds besides the Essential set and apt (no Recommends).
IMAGE_PACKAGES: tuple[str, ...] = (
    "linux-image-amd64",
    "systemd-sysv",
    "udev",
    "dbus",
    "cloud-init",
    "openssh-server",
    "qemu-guest-agent",
    "ifupdown",
    "isc-dhcp-client",
    "iproute2",
    "netbase",
    "e2fsprogs",
    "sudo",
)
# Kernel modules no virtual guest here loads (sound, graphics, radios, ...): about 150 MB.
PRUNED_MODULE_DIRS: tuple[str, ...] = (
    "kernel/sound",
    "kernel/drivers/gpu",
    "kernel/drivers/media",
    "kernel/drivers/infiniband",
    "kernel/drivers/net/wireless",
    "kernel/drivers/staging",
    "kernel/drivers/iio",
    "kernel/drivers/comedi",
    "kernel/drivers/isdn",
    "kernel/drivers/bluetooth",
    "kernel/net/bluetooth",
    "kernel/net/wireless",
    "kernel/net/mac80211",
)
# Documentation and translations are not installed at all (dpkg path filters).
_DPKG_OPTIONS: tuple[str, ...] = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)

# Files laid over the tree after the packages are installed: path -> (mode, content).
IMAGE_FILES: dict[str, tuple[int, str]] = {
    # NoCloud only: no probing of link-local or other metadata addresses, and no waiting for
    # them. Without a locales package the C.UTF-8 locale is the only one there is.
    "etc/cloud/cloud.cfg.d/90-vmportal.cfg": (
        0o644,
        "# vmportal: seeds come from a NoCloud volume (label cidata) only.\n"
        "datasource_list: [ NoCloud, None ]\n"
        "locale: C.UTF-8\n"
        "# RSA keys take seconds to make under emulation; these take milliseconds.\n"
        "ssh_genkeytypes: [ ed25519, ecdsa ]\n"
        "# No bootloader: the guest boots its kernel directly.\n"
        "grub_dpkg:\n  enabled: false\n",
    ),
    "etc/fstab": (
        0o644,
        f"LABEL={ROOT_LABEL} / ext4 defaults,errors=remount-ro 0 1\n",
    ),
    "etc/hostname": (0o644, "debian\n"),
    "etc/hosts": (
        0o644,
        "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n",
    ),
    # dhclient writes it from the lease.
    "etc/resolv.conf": (0o644, ""),
    # cloud-init writes interfaces.d/50-cloud-init (its DHCP fallback when the seed has none).
    "etc/network/interfaces": (
        0o644,
        "# interfaces(5); cloud-init writes the guest's NICs into interfaces.d.\n"
        "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n",
    ),
    # A NIC without DHCP must not hold the boot for minutes (dhclient's default is 60 s, and
    # ifupdown-wait-online's 300 s).
    "etc/dhcp/dhclient.conf": (
        0o644,
        "option rfc3442-classless-static-routes code 121 = array of unsigned integer 8;\n"
        "send host-name = gethostname();\n"
        "request subnet-mask, broadcast-address, time-offset, routers,\n"
        "\tdomain-name, domain-name-servers, domain-search, host-name,\n"
        "\tinterface-mtu, rfc3442-classless-static-routes, ntp-servers;\n"
        "timeout 30;\n",
    ),
    "etc/default/networking": (0o644, "WAIT_ONLINE_TIMEOUT=30\n"),
    "etc/systemd/system/networking.service.d/vmportal.conf": (
        0o644,
        "[Service]\nTimeoutStartSec=90s\n",
    ),
    # Host keys are not in the image: cloud-init makes them on first boot, and should it not
    # have made any, sshd makes them before it starts rather than refusing to start.
    "etc/systemd/system/ssh.service.d/vmportal.conf": (
        0o644,
        "[Service]\nExecStartPre=\n"
        "ExecStartPre=/bin/sh -c 'ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || ssh-keygen -A'\n"
        "ExecStartPre=/usr/sbin/sshd -t\n",
    ),
    # A small initrd: only what finds an ext4 root on a virtio disk (by label, through udev).
    "etc/initramfs-tools/conf.d/vmportal.conf": (0o644, "MODULES=list\nCOMPRESS=zstd\n"),
    "etc/initramfs-tools/modules": (
        0o644,
        "virtio_pci\nvirtio_blk\nvirtio_scsi\nsd_mod\next4\n",
    ),
}

# Run on the host after IMAGE_FILES are in place; $1 is the tree.
_CUSTOMIZE_SCRIPT = r"""set -eu
root=$1
in_root() { chroot "$root" "$@"; }
for version in $(ls "$root/usr/lib/modules"); do
    for dir in @PRUNED@; do rm -rf "$root/usr/lib/modules/$version/$dir"; done
    in_root depmod "$version"
done
in_root update-initramfs -u -k all
in_root systemctl enable serial-getty@ttyS0.service
# Nothing in a guest here reaches a mirror; the timers would only try.
in_root systemctl disable apt-daily.timer apt-daily-upgrade.timer
# systemd-networkd does not run here; its wait-online must not hold the boot either.
in_root systemctl mask systemd-networkd-wait-online.service
rm -f "$root"/etc/ssh/ssh_host_*
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old
rm -rf "$root"/var/lib/cloud "$root"/var/log/*.log "$root"/tmp/* "$root"/root/.cache
rm -f "$root"/boot/*.old-dkms "$root"/boot/*.bak
"""

# Bump when the shape of the cache changes in a way the recipe text does not show.
_RECIPE_VERSION = 1
_MANIFEST = "manifest.json"
_FILES = {"base": "base.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img"}
_BUILD_PREFIX = ".build-"


class BuildError(RuntimeError):
    """A build step failed; the message names the step and the tool's stderr tail."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"Debian image build failed at {step}: {detail}")
        self.step = step
        self.detail = detail


@dataclass(frozen=True)
class DebianImage:
    """Paths of the built artifacts (one cache folder) and how to boot them."""

    base: Path  # qcow2 of the ext4 root filesystem (no partition table)
    kernel: Path
    initrd: Path
    kernel_version: str
    default_user: str = DEFAULT_USER
    cmdline: str = CMDLINE


# --- apt sources ------------------------------------------------------------------------------


def apt_sources(suite: str = SUITE, apt_dir: Path = Path("/etc/apt")) -> list[str]:
    """This machine's apt sources for suite (and suite-updates, suite-security) as one-line
    ``deb ...`` entries, from sources.list, sources.list.d/*.list and deb822 *.sources."""
    entries: list[str] = []
    lists = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in lists:
        with contextlib.suppress(OSError):
            entries += _one_line_entries(path.read_text(), suite)
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            entries += _deb822_entries(path.read_text(), suite)
    return list(dict.fromkeys(entries))


def _wanted_suite(name: str, suite: str) -> bool:
    return name in (suite, f"{suite}-updates", f"{suite}-security")


def _one_line_entries(text: str, suite: str) -> list[str]:
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        words = line.split()
        if not words or words[0] != "deb":
            continue
        rest = words[1:]
        options = ""
        if rest and rest[0].startswith("["):
            # Options may hold spaces: "[ arch=amd64 signed-by=... ]".
            joined = " ".join(rest)
            end = joined.find("]")
            if end < 0:
                continue
            options = joined[: end + 1]
            rest = joined[end + 1 :].split()
        if len(rest) < 3 or not _wanted_suite(rest[1], suite) or rest[0].startswith("cdrom:"):
            continue
        entries.append(" ".join(word for word in ["deb", options, *rest] if word))
    return entries


def _deb822_entries(text: str, suite: str) -> list[str]:
    entries = []
    for stanza in _deb822_stanzas(text):
        if stanza.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in stanza.get("types", "").split():
            continue
        options = []
        signed_by = stanza.get("signed-by", "")
        # An inline key cannot go on one line; apt's trusted keyrings then apply.
        if signed_by and "\n" not in signed_by and "BEGIN PGP" not in signed_by:
            options.append(f"signed-by={signed_by}")
        if stanza.get("architectures"):
            options.append("arch=" + ",".join(stanza["architectures"].split()))
        opts = f"[{' '.join(options)}]" if options else ""
        components = stanza.get("components", "").split()
        for uri in stanza.get("uris", "").split():
            if uri.startswith("cdrom:"):
                continue
            for name in stanza.get("suites", "").split():
                if _wanted_suite(name, suite) and components:
                    entries.append(" ".join(w for w in ["deb", opts, uri, name, *components] if w))
    return entries


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    """deb822 paragraphs as lower-cased field -> value (continuation lines joined by newlines)."""
    fields: dict[str, str] = {}
    last = ""
    for raw in [*text.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if fields:
                yield fields
            fields, last = {}, ""
        elif raw[0] in " \t" and last:
            fields[last] += "\n" + raw.strip()
        elif ":" in raw:
            key, value = raw.split(":", 1)
            last = key.strip().lower()
            fields[last] = value.strip()


# --- cache ------------------------------------------------------------------------------------


def _recipe_hash() -> str:
    """Hash of everything that shapes the artifacts, so a changed recipe invalidates the cache."""
    parts = [
        str(_RECIPE_VERSION),
        SUITE,
        CMDLINE,
        str(VIRTUAL_SIZE_MIB),
        repr(IMAGE_PACKAGES),
        repr(PRUNED_MODULE_DIRS),
        repr(_DPKG_OPTIONS),
        json.dumps(IMAGE_FILES, sort_keys=True),
        _CUSTOMIZE_SCRIPT,
        # The builder's own code too: the cache is shared by every checkout on the machine
        # (settings.DEMO_DIR), and must not outlive a change to how it is built.
        Path(__file__).read_text(),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cached(cache_dir: Path) -> DebianImage | None:
    """The cached image if it is complete and built by the current recipe, else None."""
    root = Path(cache_dir)
    try:
        manifest = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("recipe") != _recipe_hash():
        return None
    version = manifest.get("kernel_version")
    if not isinstance(version, str) or not version:
        return None
    if not all(
        (root / name).is_file() and (root / name).stat().st_size > 0 for name in _FILES.values()
    ):
        return None
    return DebianImage(
        base=root / _FILES["base"],
        kernel=root / _FILES["kernel"],
        initrd=root / _FILES["initrd"],
        kernel_version=version,
        default_user=str(manifest.get("default_user", DEFAULT_USER)),
        cmdline=str(manifest.get("cmdline", CMDLINE)),
    )


def build(
    cache_dir: Path, *, force: bool = False, log: Callable[[str], None] = print
) -> DebianImage:
    """Return the cached image, building it first when missing, stale or forced."""
    cache_dir = Path(cache_dir)
    if not force and (image := cached(cache_dir)) is not None:
        return image
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / ".lock"):
        # Another process may have finished the build while we waited for the lock.
        if not force and (image := cached(cache_dir)) is not None:
            return image
        for stale in cache_dir.glob(f"{_BUILD_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        _ensure_tools(log)
        work = Path(tempfile.mkdtemp(prefix=_BUILD_PREFIX, dir=cache_dir))
        try:
            started = time.monotonic()
            out = work / "out"
            out.mkdir()
            version = _build_into(out, work, log)
            for path in out.iterdir():
                path.chmod(0o644)  # QEMU (libvirt-qemu) reads copies of these as another user
            # The manifest goes first and comes back last: a build cut short in between
            # leaves a folder that cached() refuses, never a mix of old and new files.
            (cache_dir / _MANIFEST).unlink(missing_ok=True)
            for name in _FILES.values():
                os.replace(out / name, cache_dir / name)
            manifest = {
                "recipe": _recipe_hash(),
                "suite": SUITE,
                "kernel_version": version,
                "default_user": DEFAULT_USER,
                "cmdline": CMDLINE,
                "virtual_size_mib": VIRTUAL_SIZE_MIB,
                "build_seconds": round(time.monotonic() - started, 1),
            }
            (cache_dir / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    image = cached(cache_dir)
    if image is None:
        raise BuildError("cache check", f"{cache_dir} incomplete after build")
    size = image.base.stat().st_size / (1024 * 1024)
    version = image.kernel_version
    log(f"Debian image ready in {cache_dir} (kernel {version}, base.qcow2 {size:.0f} MiB)")
    return image


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- build steps ------------------------------------------------------------------------------


def _ensure_tools(log: Callable[[str], None]) -> None:
    missing = [p for p in REQUIRED_DEBIAN_PACKAGES if not _installed(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise BuildError("tools", f"missing Debian packages {missing}; install them as root")
    log(f"Debian image: installing Debian packages {' '.join(missing)}")
    _run("apt-get update", ["apt-get", "update", "-q"])
    _run(
        "apt-get install",
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        env={"DEBIAN_FRONTEND": "noninteractive"},
    )


def _installed(package: str) -> bool:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    )
    return proc.returncode == 0 and "install ok installed" in proc.stdout


def _build_into(out: Path, work: Path, log: Callable[[str], None]) -> str:
    """Build every artifact into out (scratch space in work); return the kernel version."""
    if os.geteuid() != 0:
        raise BuildError("mmdebstrap", "building the image needs root (chroot, device nodes)")
    sources = apt_sources()
    if not sources:
        raise BuildError(
            "apt sources", f"no 'deb' source for {SUITE} in this machine's apt sources"
        )
    tree = work / "tree"
    overlay = work / "overlay"
    _write_overlay(overlay, IMAGE_FILES.items())
    script = work / "customize.sh"
    script.write_text(_CUSTOMIZE_SCRIPT.replace("@PRUNED@", " ".join(PRUNED_MODULE_DIRS)))

    started = time.monotonic()
    log(
        f"Debian image: mmdebstrap {SUITE} ({len(IMAGE_PACKAGES)} packages, {len(sources)} sources)"
    )
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=apt",
        "--include=" + ",".join(IMAGE_PACKAGES),
        # The customize script empties the tree's apt lists and cache itself. mmdebstrap's own
        # clean-up (`apt-get update` with no sources, then `apt-get clean`) emptied this
        # machine's lists instead (seen: /var/lib/apt/lists left with only lock, partial and
        # auxfiles after every build), so it is skipped.
        "--skip=cleanup/apt",
        *(f"--dpkgopt={option}" for option in _DPKG_OPTIONS),
        f"--customize-hook=sync-in {shlex.quote(str(overlay))} /",
        f'--customize-hook=sh {shlex.quote(str(script))} "$1"',
        SUITE,
        str(tree),
        *sources,
    ]
    _run("mmdebstrap", argv, timeout=1800)
    log(f"Debian image: tree made in {time.monotonic() - started:.0f} s")

    kernel, version = _find_boot_file(tree, "vmlinuz")
    initrd, _ = _find_boot_file(tree, "initrd.img", version)
    shutil.copyfile(kernel, out / _FILES["kernel"])
    shutil.copyfile(initrd, out / _FILES["initrd"])

    started = time.monotonic()
    raw = work / "root.ext4"
    _run(
        "mkfs.ext4",
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            ROOT_LABEL,
            "-d",
            str(tree),
            str(raw),
            f"{VIRTUAL_SIZE_MIB}M",
        ],
    )
    shutil.rmtree(tree)
    _run(
        "qemu-img convert",
        ["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / _FILES["base"])],
    )
    raw.unlink()
    log(f"Debian image: filesystem and qcow2 made in {time.monotonic() - started:.0f} s")
    return version


def _write_overlay(root: Path, files: Iterable[tuple[str, tuple[int, str]]]) -> None:
    root.mkdir()
    for relative, (mode, content) in files:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(mode)
    # sync-in copies the folders' modes too.
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        folder.chmod(0o755)


def _find_boot_file(tree: Path, stem: str, version: str | None = None) -> tuple[Path, str]:
    pattern = f"{stem}-{version}" if version else f"{stem}-*"
    found = sorted((tree / "boot").glob(pattern))
    if len(found) != 1:
        raise BuildError("find kernel", f"expected one boot/{pattern}, found {found}")
    return found[0], found[0].name.removeprefix(f"{stem}-")


def _run(
    step: str,
    argv: Sequence[str],
    *,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> str:
    """Run a tool; raise BuildError naming the step and the stderr tail when it fails."""
    full_env = {**os.environ, "LC_ALL": "C.UTF-8", **(env or {})}
    try:
        proc = subprocess.run(
            list(argv),
            env=full_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise BuildError(step, f"{argv[0]} not found (install {argv[0]}'s package)") from exc
    except subprocess.TimeoutExpired as exc:
        raise BuildError(step, f"{argv[0]} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise BuildError(step, f"{argv[0]} exited {proc.returncode}: {tail}")
    return proc.stdout


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m provisioning.demo.debian",
        description="Build the Debian 12 cloud image into a cache folder.",
    )
    parser.add_argument(
        "cache_dir", type=Path, help="folder of the artifacts, e.g. /var/cache/vmportal/demo/debian"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = parser.parse_args(argv)
    try:
        build(args.cache_dir, force=args.force)
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
