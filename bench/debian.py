"""debian_create_to_ssh_s, debian_ssh_vs_virt_install: the Debian cloud image, create to SSH.

Both boot the same base image with the same key on the same libvirtd, timed until `ssh` with
that key runs `hostname` on the guest:

* the portal: the new-guest form POSTed over HTTP (the key ticked) until SSH answers, through
  its whole path: overlay and seed made, defined and started by the worker, the address found by
  the host's looks and shown on the row (also timed: `debian_create_to_address_s`);
* `virt-install --import --cloud-init user-data=…,meta-data=…` with an overlay of the same image,
  the same kernel boot and the same user-data, from the process start until SSH answers.

The libvirtd is one of the bench's own in a network namespace (scripts/second-libvirtd.sh with
SECOND_LIBVIRTD_NETNS=1), with an isolated network: the guests' DHCP and the SSH client stay in
there. A worker and a listener for that host run beside the bench stack. Runs are interleaved.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import BENCH_DIR, ROOT, median, wait_for
from bench.context import Context

SCRIPT = ROOT / "scripts" / "second-libvirtd.sh"
NETNS_DIR = BENCH_DIR / "debnet"
HOST = "debnet"
SSH_TIMEOUT = 420.0


def _script(*args: str, netns: bool = False) -> str:
    env = {**os.environ, "SECOND_LIBVIRTD_PRIVATE": "", "SECOND_LIBVIRTD_NETNS": "1" * netns}
    done = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=180, check=False, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"{SCRIPT.name} {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def _in_netns(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "netns-exec", str(NETNS_DIR), "--", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _ssh_answers(key: Path, address: str, expect: str) -> bool:
    argv = [
        "ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
        "-o", "LogLevel=ERROR", f"debian@{address}", "hostname",
    ]  # fmt: skip
    try:
        done = _in_netns(argv, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and done.stdout.strip() == expect


def _key(folder: Path) -> tuple[Path, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
    return private, f"{public.decode()} bench@vmportal"


def _lease(hv: Any, network: str, mac: str) -> str | None:
    leases = hv.call(lambda conn: conn.networkLookupByName(network).DHCPLeases())
    return next((str(item["ipaddr"]) for item in leases if item["mac"] == mac), None)


def portal_run(
    ctx: Context, env: dict[str, str], template: Any, key: Any, private: Path
) -> dict[str, float]:
    """POST the form; seconds until the row shows an address, and until SSH answers."""
    from provisioning.hypervisor import storage
    from provisioning.hypervisor.connection import get_hypervisor
    from provisioning.models import Guest
    from provisioning.services.demo import DEMO_POOL_NAME
    from provisioning.services.provision.spec import seed_volume

    name = f"bench-deb{secrets.token_hex(2)}"
    session = ctx.session("bench")
    fields = {
        "name": name,
        "vcpus": str(template.vcpus_default),
        "memory_mib": str(template.memory_mib_default),
        "disk_mib": str(template.disk_mib_default),
        "ssh_keys": str(key.pk),
    }
    start = time.monotonic()
    answer = session.post(f"/guests/new?template={template.pk}", fields)
    if answer.status != 302 or not re.search(r"/requests/\d+/", answer.location):
        raise RuntimeError(f"the new-guest form was refused (HTTP {answer.status})")
    guest = Guest.objects.get(name=name)
    uri = env["LIBVIRT_URI"]
    ctx.made.domain(uri, str(guest.uuid))

    def address() -> str | None:
        guest.refresh_from_db(fields=["addresses"])
        found = [a["ip"] for a in guest.addresses if a.get("family") == "ipv4"]
        return found[0] if found else None

    ip = wait_for(address, timeout=SSH_TIMEOUT, what="the guest's address on its row", every=0.2)
    shown = time.monotonic() - start
    wait_for(lambda: _ssh_answers(private, ip, name), timeout=SSH_TIMEOUT, what="SSH", every=0.5)
    answered = time.monotonic() - start
    ctx.made.remove(uri, str(guest.uuid))  # its disk; the seed is the portal's own volume
    storage.delete_volume(get_hypervisor(uri), DEMO_POOL_NAME, seed_volume(guest))
    return {"address": shown, "ssh": answered}


def virt_install_run(
    ctx: Context, hv: Any, uri: str, pool: str, network: str, image: Any, public: str,
    private: Path, work: Path,
) -> float:  # fmt: skip
    """virt-install --import --cloud-init with an overlay of the image; seconds to SSH."""
    from provisioning import cloudinit
    from provisioning.hypervisor import operations, storage
    from provisioning.services.demo import DEBIAN_BASE_VOLUME

    name = f"bench-vdeb{secrets.token_hex(2)}"
    base = storage.get_volume(hv, pool, DEBIAN_BASE_VOLUME)
    user_data = work / f"{name}-user-data"
    user_data.write_text(
        cloudinit.render(
            cloudinit.user_data(template={}, owner={}, hostname=name, user="debian", keys=[public]),
            header=cloudinit.HEADER,
        )
    )
    meta_data = work / f"{name}-meta-data"
    meta_data.write_text(cloudinit.render(cloudinit.meta_data(instance_id=name, hostname=name)))
    mac = ":".join(["52:54:00", *(f"{b:02x}" for b in secrets.token_bytes(3))])
    from provisioning.services.demo import BOOT_DIR

    # The copies the portal's template boots, where QEMU may read them.
    kernel, initrd = BOOT_DIR / "debian-vmlinuz", BOOT_DIR / "debian-initrd.img"
    boot = f"kernel={kernel},initrd={initrd},kernel_args={image.cmdline}"
    argv = ["virt-install", "--connect", uri, "--name", name, "--memory", "1024", "--vcpus", "2"]
    argv += ["--disk", f"pool={pool},size=3,backing_store={base.path},backing_format=qcow2,"
             "format=qcow2,bus=virtio"]  # fmt: skip
    argv += ["--import", "--boot", boot, "--virt-type", ctx.domain_type]
    argv += ["--osinfo", "detect=on,require=off", "--graphics", "none"]
    argv += ["--network", f"network={network},mac={mac},model=virtio"]
    argv += ["--channel", "unix,target.type=virtio,target.name=org.qemu.guest_agent.0"]
    argv += ["--cloud-init", f"user-data={user_data},meta-data={meta_data}"]
    argv += ["--noautoconsole", "--wait", "0"]
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    info = operations.find_by_name(hv, name)
    if info is not None:
        ctx.made.domain(uri, info.uuid)
    if done.returncode != 0 or info is None:
        raise RuntimeError(f"virt-install failed:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}")
    ip = wait_for(lambda: _lease(hv, network, mac), timeout=SSH_TIMEOUT, what="a lease", every=0.5)
    wait_for(lambda: _ssh_answers(private, ip, name), timeout=SSH_TIMEOUT, what="SSH", every=0.5)
    seconds = time.monotonic() - start
    ctx.made.remove(uri, info.uuid)
    return seconds


def run(ctx: Context) -> dict[str, Any]:
    """Interleaved portal and virt-install runs; the portal's median and the ratio."""
    from django.conf import settings

    from provisioning.demo import debian
    from provisioning.hypervisor import networks, storage
    from provisioning.hypervisor.connection import get_hypervisor
    from provisioning.models import Host, Network
    from provisioning.services.demo import (
        DEBIAN_BASE_VOLUME,
        DEMO_POOL_NAME,
        DEMO_POOL_PATH,
        demo_seed_debian,
    )
    from provisioning.services.keys import ssh_key_add
    from tests.support import stack as processes

    runs = ctx.runs(1, 3)
    # An image `make demo-debian` put in the shared pool folder stays; one made here goes.
    base_was_there = (DEMO_POOL_PATH / DEBIAN_BASE_VOLUME).exists()
    _script("stop", str(NETNS_DIR))
    uri = _script("start", "vmportal-benchnet", str(NETNS_DIR), netns=True)
    hv = get_hypervisor(uri)
    work = Path(tempfile.mkdtemp(prefix="vmportal-bench-debian-"))
    extra: list[Any] = []
    net = f"vmportal-bench-{secrets.token_hex(2)}"
    try:
        host = Host.objects.create(
            name=HOST,
            uri=uri,
            detected_domain_type=ctx.domain_type,
            capacity_vcpus=64,
            capacity_memory_mib=1 << 20,
            capacity_disk_gib=1000,
        )
        # Inside the namespace nothing else uses an address: any private /24 will do.
        subnet = ipaddress.IPv4Network(
            f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}.0/24"
        )
        bridge = f"vpb{secrets.token_hex(3)}"
        networks.ensure_network(hv, net, bridge=bridge, subnet=subnet, nat=False)
        network = Network.objects.create(host=host, name=net, source=net)
        template = demo_seed_debian(host=host, network=network, log=ctx.log)
        image = debian.cached(settings.DEMO_DIR / "debian")
        assert image is not None
        private, public = _key(work)
        key = ssh_key_add(owner=ctx.seed.user, name="bench", text=public)
        env = {**ctx.stack.env, "LIBVIRT_URI": uri}
        extra.append(processes.start_worker(env, queues=[f"hv.{HOST}"], name="bench-debian-worker"))
        extra.append(
            processes.Proc(
                "bench-debian-listener",
                [sys.executable, "manage.py", "run_listener", "--host", HOST],
                env,
            )
        )
        times: dict[str, list[float]] = {"address": [], "portal": [], "virt-install": []}
        for index in range(runs):
            portal = portal_run(ctx, env, template, key, private)
            times["address"].append(portal["address"])
            times["portal"].append(portal["ssh"])
            ctx.log(f"debian run {index + 1}/{runs}: portal {portal['ssh']:.1f} s to SSH")
            times["virt-install"].append(
                virt_install_run(ctx, hv, uri, DEMO_POOL_NAME, net, image, public, private, work)
            )
            ctx.log(
                f"debian run {index + 1}/{runs}: virt-install {times['virt-install'][-1]:.1f} s"
            )
        portal_s, virt_s = median(times["portal"]), median(times["virt-install"])
        return {
            "figures": {
                "debian_create_to_ssh_s": portal_s,
                "debian_ssh_vs_virt_install": portal_s / virt_s,
            },
            "details": {
                "debian_create_to_address_s": median(times["address"]),
                "debian_portal_median_s": portal_s,
                "debian_virt_install_median_s": virt_s,
                "debian_seconds": times,
                "debian_runs": runs,
            },
        }
    finally:
        for proc in extra:
            proc.stop()
        for uuid in list(ctx.made.domains.get(uri, set())):
            ctx.made.remove(uri, uuid)
        if not base_was_there:
            storage.delete_volume(hv, DEMO_POOL_NAME, DEBIAN_BASE_VOLUME)
        shutil.rmtree(work, ignore_errors=True)
        _script("stop", str(NETNS_DIR))
