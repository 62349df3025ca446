"""The Debian 12 cloud image: apt sources, cache, what is baked in, and a real boot to SSH.

The boot runs on a libvirtd of its own in a network namespace of its own
(scripts/second-libvirtd.sh with SECOND_LIBVIRTD_NETNS=1): the guest's isolated network, its
DHCP server and the SSH client all live in there, so nothing this test sends leaves it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import libvirt
import libvirt_qemu
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from lxml import etree

from provisioning import cloudinit
from provisioning.demo import debian
from provisioning.hypervisor import Hypervisor, get_hypervisor
from provisioning.hypervisor import storage as hv_storage
from tests.support.netns import NetnsHost
from tests.support.qemu import (
    DEMO_CACHE,
    DOMAIN_TYPE,
    POOL_PARENT,
    STAGE_PARENT,
    Tracker,
    free_subnet,
    read_console,
    unique,
)

CACHE_DIR = DEMO_CACHE / "debian"
HOSTNAME = "deb1"
# Measured here under TCG (2 vCPUs): lease after ~30 s, SSH after ~45 s; room for a busy machine.
LEASE_TIMEOUT = 240.0
SSH_TIMEOUT = 360.0
AGENT_TIMEOUT = 120.0
STOP_TIMEOUT = 120.0
T = TypeVar("T")


# --- apt sources (unit) -----------------------------------------------------------------------


def _apt_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (apt / name).write_text(text)
    return apt


def test_it_reads_deb822_sources_of_the_suite_and_its_updates_and_security() -> None:
    text = (
        "Types: deb deb-src\nURIs: http://mirror.invalid/debian\n"
        "Suites: bookworm bookworm-updates bookworm-backports\nComponents: main contrib\n"
        "Signed-By: /usr/share/keyrings/k.gpg\n\n"
        "# a comment\nTypes: deb\nURIs: http://mirror.invalid/security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.invalid/other\nSuites: nodistro\nComponents: main\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://mirror.invalid/off\nSuites: bookworm\n"
        "Components: main\n"
    )
    signed = "deb [signed-by=/usr/share/keyrings/k.gpg] http://mirror.invalid/debian"
    assert debian._deb822_entries(text, "bookworm") == [
        f"{signed} bookworm main contrib",
        f"{signed} bookworm-updates main contrib",
        "deb http://mirror.invalid/security bookworm-security main",
    ]


def test_it_reads_one_line_sources_with_options_and_skips_the_rest(tmp_path: Path) -> None:
    apt = _apt_dir(
        tmp_path,
        {
            "sources.list": (
                "deb [ arch=amd64 signed-by=/k.gpg ] http://mirror.invalid/debian bookworm main\n"
                "deb-src http://mirror.invalid/debian bookworm main\n"
                "# deb http://mirror.invalid/debian bookworm-updates main\n"
                "deb cdrom:[Debian 12]/ bookworm main\n"
                "deb http://mirror.invalid/debian bullseye main\n"
            ),
            "sources.list.d/extra.list": "deb http://mirror.invalid/debian bookworm-updates main\n",
            "sources.list.d/off.list.disabled": "deb http://mirror.invalid/x bookworm main\n",
        },
    )
    assert debian.apt_sources("bookworm", apt) == [
        "deb [ arch=amd64 signed-by=/k.gpg ] http://mirror.invalid/debian bookworm main",
        "deb http://mirror.invalid/debian bookworm-updates main",
    ]


def test_it_drops_an_inline_key_it_cannot_put_on_one_line() -> None:
    text = (
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm\nComponents: main\n"
        "Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n"
        " -----END PGP PUBLIC KEY BLOCK-----\n"
    )
    assert debian._deb822_entries(text, "bookworm") == [
        "deb http://mirror.invalid/debian bookworm main"
    ]


def test_it_finds_sources_on_this_machine() -> None:
    # The build reads them at run time; this machine has apt sources for Debian 12.
    sources = debian.apt_sources()
    assert sources
    assert all(s.startswith("deb ") for s in sources)


# --- cache (unit) -----------------------------------------------------------------------------


def test_it_reports_an_empty_cache_dir_as_not_cached(tmp_path: Path) -> None:
    assert debian.cached(tmp_path) is None


def _fake_cache(root: Path, recipe: str) -> None:
    for name in ("base.qcow2", "vmlinuz", "initrd.img"):
        (root / name).write_bytes(b"x")
    manifest = {"recipe": recipe, "kernel_version": "6.1.0-1-amd64", "default_user": "debian"}
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_it_reads_a_complete_cache_and_refuses_another_recipe_or_a_missing_file(
    tmp_path: Path,
) -> None:
    _fake_cache(tmp_path, debian._recipe_hash())
    image = debian.cached(tmp_path)
    assert image is not None
    assert image.base == tmp_path / "base.qcow2"
    assert (image.default_user, image.kernel_version) == ("debian", "6.1.0-1-amd64")
    assert image.cmdline == "root=LABEL=root ro console=ttyS0"
    (tmp_path / "initrd.img").unlink()
    assert debian.cached(tmp_path) is None
    _fake_cache(tmp_path, "older")
    assert debian.cached(tmp_path) is None


def test_it_pins_cloud_init_to_nocloud() -> None:
    _, cfg = debian.IMAGE_FILES["etc/cloud/cloud.cfg.d/90-vmportal.cfg"]
    assert "datasource_list: [ NoCloud, None ]" in cfg.splitlines()


# --- the real image ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def image() -> debian.DebianImage:
    if os.geteuid() != 0:
        pytest.skip("building the Debian image needs root")
    return debian.build(CACHE_DIR)


def _debugfs(raw: Path, request: str) -> str:
    proc = subprocess.run(
        ["debugfs", "-R", request, str(raw)], capture_output=True, text=True, check=True
    )
    return proc.stdout


def _names(raw: Path, folder: str) -> set[str]:
    """A folder's entries in the filesystem image (debugfs `ls -p`: /ino/mode/uid/gid/name/)."""
    lines = _debugfs(raw, f"ls -p {folder}").splitlines()
    return {line.split("/")[5] for line in lines if line.count("/") >= 6} - {".", ".."}


@pytest.mark.qemu
@pytest.mark.debian
@pytest.mark.timeout(1200)
def test_it_bakes_no_host_keys_or_apt_lists_into_the_image(
    image: debian.DebianImage, tmp_path: Path
) -> None:
    raw = tmp_path / "root.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(image.base), str(raw)], check=True, timeout=120
    )
    ssh = _names(raw, "/etc/ssh")
    assert "sshd_config" in ssh
    assert not [name for name in ssh if name.startswith("ssh_host_")]
    assert _names(raw, "/var/lib/apt/lists") == set()
    assert "serial-getty@ttyS0.service" in _names(raw, "/etc/systemd/system/getty.target.wants")
    cfg = _debugfs(raw, "cat /etc/cloud/cloud.cfg.d/90-vmportal.cfg")
    assert "datasource_list: [ NoCloud, None ]" in cfg
    assert "LABEL=root" in _debugfs(raw, "cat /etc/fstab")
    label = subprocess.run(
        ["blkid", "-o", "value", "-s", "LABEL", str(raw)], capture_output=True, text=True
    )
    assert label.stdout.strip() == "root"


# --- a boot to SSH in a network namespace -----------------------------------------------------


@pytest.fixture
def tracker(netns_host: NetnsHost) -> Iterator[Tracker]:
    made = Tracker(get_hypervisor(netns_host.uri))
    yield made
    made.close()


def _key_pair(folder: Path) -> tuple[Path, str]:
    """A fresh ed25519 key: the private key's file (mode 0600) and the public key line."""
    key = Ed25519PrivateKey.generate()
    private = folder / "id_ed25519"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public.decode() + " vmportal-test"


def _network_xml(name: str, bridge: str, hv: Hypervisor) -> str:
    """An isolated network (no <forward>: reaches nothing) handing out addresses by DHCP."""
    subnet = free_subnet(hv)
    hosts = list(subnet.hosts())
    root = etree.Element("network")
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "bridge", name=bridge, stp="off", delay="0")
    ip = etree.SubElement(root, "ip", address=str(hosts[0]), netmask=str(subnet.netmask))
    dhcp = etree.SubElement(ip, "dhcp")
    etree.SubElement(dhcp, "range", start=str(hosts[9]), end=str(hosts[49]))
    return etree.tostring(root, encoding="unicode")


def _overlay_xml(name: str, backing: Path, capacity_mib: int) -> str:
    root = etree.Element("volume")
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "capacity", unit="MiB").text = str(capacity_mib)
    target = etree.SubElement(root, "target")
    etree.SubElement(target, "format", type="qcow2")
    backing_store = etree.SubElement(root, "backingStore")
    etree.SubElement(backing_store, "path").text = str(backing)
    etree.SubElement(backing_store, "format", type="qcow2")
    return etree.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class GuestFiles:
    kernel: Path
    initrd: Path
    seed: Path
    console: Path


def _domain_xml(
    *, name: str, uuid: str, image: debian.DebianImage, files: GuestFiles, pool: str,
    volume: str, network: str, mac: str,
) -> str:  # fmt: skip
    root = etree.Element("domain", type=DOMAIN_TYPE)
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "uuid").text = uuid
    etree.SubElement(root, "memory", unit="MiB").text = "1024"
    etree.SubElement(root, "vcpu").text = "2"
    os_el = etree.SubElement(root, "os")
    etree.SubElement(os_el, "type").text = "hvm"
    etree.SubElement(os_el, "kernel").text = str(files.kernel)
    etree.SubElement(os_el, "initrd").text = str(files.initrd)
    etree.SubElement(os_el, "cmdline").text = image.cmdline
    features = etree.SubElement(root, "features")
    etree.SubElement(features, "acpi")
    etree.SubElement(root, "on_poweroff").text = "destroy"
    etree.SubElement(root, "on_reboot").text = "restart"
    etree.SubElement(root, "on_crash").text = "destroy"
    devices = etree.SubElement(root, "devices")
    disk = etree.SubElement(devices, "disk", type="volume", device="disk")
    etree.SubElement(disk, "driver", name="qemu", type="qcow2")
    etree.SubElement(disk, "source", pool=pool, volume=volume)
    etree.SubElement(disk, "target", dev="vda", bus="virtio")
    seed = etree.SubElement(devices, "disk", type="file", device="disk")
    etree.SubElement(seed, "driver", name="qemu", type="raw")
    etree.SubElement(seed, "source", file=str(files.seed))
    etree.SubElement(seed, "target", dev="vdb", bus="virtio")
    etree.SubElement(seed, "readonly")
    nic = etree.SubElement(devices, "interface", type="network")
    etree.SubElement(nic, "source", network=network)
    etree.SubElement(nic, "mac", address=mac)
    etree.SubElement(nic, "model", type="virtio")
    serial = etree.SubElement(devices, "serial", type="pty")
    etree.SubElement(serial, "log", file=str(files.console), append="off")
    etree.SubElement(serial, "target", port="0")
    console = etree.SubElement(devices, "console", type="pty")
    etree.SubElement(console, "target", type="serial", port="0")
    channel = etree.SubElement(devices, "channel", type="unix")
    etree.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    # Entropy for the host keys cloud-init makes at first boot.
    rng = etree.SubElement(devices, "rng", model="virtio")
    etree.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    etree.SubElement(devices, "memballoon", model="none")
    return etree.tostring(root, encoding="unicode")


def _poll(what: str, probe: Callable[[], T | None], timeout: float, console: Path) -> T:
    """probe() until it returns something; fail at the deadline with the console's tail."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            tail = "\n".join(read_console(console).splitlines()[-30:])
            pytest.fail(f"no {what} within {timeout:.0f} s; console:\n{tail}")
        time.sleep(0.5)  # polling pace; the deadline decides


def _stage(image: debian.DebianImage, tracker: Tracker, seed: bytes) -> GuestFiles:
    """Kernel, initrd and seed where QEMU may read (and relabel) them, away from the cache."""
    root = tracker.folder(STAGE_PARENT / unique("deb"))
    root.mkdir(mode=0o755, parents=True)
    shutil.copyfile(image.kernel, root / "vmlinuz")
    shutil.copyfile(image.initrd, root / "initrd.img")
    (root / "seed.iso").write_bytes(seed)
    for path in root.iterdir():
        path.chmod(0o644)
    return GuestFiles(
        root / "vmlinuz", root / "initrd.img", root / "seed.iso", root / "console.log"
    )


@pytest.mark.qemu
@pytest.mark.debian
@pytest.mark.timeout(1500)
def test_it_boots_the_image_to_ssh_and_shuts_down_through_the_guest_agent(
    image: debian.DebianImage, netns_host: NetnsHost, tracker: Tracker, tmp_path: Path
) -> None:
    hv = tracker.hv
    key, public_key = _key_pair(tmp_path)

    pool = unique("debpool")
    pool_path = POOL_PARENT / pool
    tracker.pool(pool, pool_path)
    hv_storage.ensure_dir_pool(hv, pool, str(pool_path))
    shutil.copyfile(image.base, pool_path / "base.qcow2")
    (pool_path / "base.qcow2").chmod(0o644)
    overlay = "deb1.qcow2"

    def make_overlay(conn: libvirt.virConnect) -> None:
        lv_pool = conn.storagePoolLookupByName(pool)
        lv_pool.refresh(0)
        lv_pool.createXML(_overlay_xml(overlay, pool_path / "base.qcow2", 3072), 0)

    hv.call(make_overlay, idempotent=False)

    network = tracker.network(unique("debnet"))
    bridge = f"vpd{secrets.token_hex(3)}"
    hv.call(lambda conn: conn.networkCreateXML(_network_xml(network, bridge, hv)))

    uuid = str(uuidlib.uuid4())
    seed = cloudinit.seed_iso(
        meta_data=cloudinit.meta_data(instance_id=f"i-{uuid}", hostname=HOSTNAME),
        user_data=cloudinit.user_data(
            template={}, owner={}, hostname=HOSTNAME, user=image.default_user, keys=[public_key]
        ),
        network_config=None,
    )
    files = _stage(image, tracker, seed)
    mac = ":".join(["52:54:00", *(f"{b:02x}" for b in secrets.token_bytes(3))])
    xml = _domain_xml(
        name=unique("deb"), uuid=uuid, image=image, files=files, pool=pool, volume=overlay,
        network=network, mac=mac,
    )  # fmt: skip

    tracker.domain(uuid)
    dom = hv.call(lambda conn: conn.defineXML(xml))
    created = time.monotonic()
    dom.create()

    def lease() -> str | None:
        leases = hv.call(lambda conn: conn.networkLookupByName(network).DHCPLeases())
        return next((str(item["ipaddr"]) for item in leases if item["mac"] == mac), None)

    address = _poll("DHCP lease", lease, LEASE_TIMEOUT, files.console)
    leased = time.monotonic() - created

    ssh = [
        "ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
        "-o", "LogLevel=ERROR", f"{image.default_user}@{address}", "hostname",
    ]  # fmt: skip

    def answers() -> str | None:
        try:
            proc = netns_host.run(ssh, timeout=30)
        except subprocess.TimeoutExpired:
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    hostname = _poll("SSH answer", answers, SSH_TIMEOUT - leased, files.console)
    answered = time.monotonic() - created
    assert hostname == HOSTNAME

    def agent_ping() -> str | None:
        try:
            return libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 5, 0)
        except libvirt.libvirtError:
            return None

    pong = _poll("guest agent answer", agent_ping, AGENT_TIMEOUT, files.console)
    assert json.loads(pong) == {"return": {}}
    agent = time.monotonic() - created

    asked = time.monotonic()
    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)

    def stopped() -> tuple[int, int] | None:
        state, reason = dom.state()
        return (state, reason) if state == libvirt.VIR_DOMAIN_SHUTOFF else None

    state = _poll("power off", stopped, STOP_TIMEOUT, files.console)
    assert state == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN)
    print(
        f"TIMING debian ({DOMAIN_TYPE}): create -> lease {leased:.1f} s, -> SSH {answered:.1f} s,"
        f" -> agent {agent:.1f} s; agent shutdown -> off {time.monotonic() - asked:.1f} s"
    )
