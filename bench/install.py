"""install_vs_raw, install_vs_virt_install: the tiny guest's two-phase install on real QEMU.

Each figure is wall-clock time from the user's action to phase 2 running: the portal from the HTTP
POST of the new-guest form until its request is `running` in the database; the raw script and
virt-install from their process start until phase 2 runs. Runs are interleaved (portal, raw,
virt-install, portal, ...) so drifting machine load hits all three alike; medians are compared.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, median, wait_for
from bench.context import Context
from bench.stack import INITRD, KERNEL, QEMU_URI

CONSOLE_DIR = Path("/var/log/libvirt/qemu")
DONE = "VMPORTAL-INSTALL-DONE installed"
INSTALL_TIMEOUT = 300.0


def _disk_mib() -> int:
    from provisioning.demo import tinyguest

    return tinyguest.DISK_MIN_MIB


def _cmdline() -> str:
    from provisioning.demo import tinyguest

    return tinyguest.install_cmdline("installed")


def _installed(log: Path) -> None:
    """Refuse a run whose installer did not finish its work (a fast failure is no result)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    if DONE not in text:
        raise RuntimeError(f"the installer did not report success in {log}:\n{text[-1500:]}")


def portal_run(ctx: Context, session: Any, index: int, steps: list[Any]) -> float:
    """POST the new-guest form; seconds until the request is running."""
    from provisioning.models import ProvisioningRequest
    from provisioning.services.consoles import console_log_path

    name = f"bench-p{index}-{secrets.token_hex(2)}"
    ctx.made.file(CONSOLE_DIR / f"{name}.log")  # libvirt's own log of the domain
    fields = {"name": name, "vcpus": "1", "memory_mib": "256", "disk_mib": str(_disk_mib())}
    start = time.monotonic()
    answer = session.post(f"/guests/new?template={ctx.seed.demo.pk}", fields)
    found = re.search(r"/requests/(\d+)/", answer.location)
    if answer.status != 302 or found is None:
        raise RuntimeError(f"the new-guest form was refused (HTTP {answer.status})")
    pk = int(found.group(1))
    guest_uuid = str(ProvisioningRequest.objects.values_list("guest__uuid", flat=True).get(pk=pk))
    ctx.made.domain(QEMU_URI, guest_uuid)

    def running() -> bool:
        status = ProvisioningRequest.objects.values_list("status", flat=True).get(pk=pk)
        if status in ("failed", "cancelled"):
            error = ProvisioningRequest.objects.get(pk=pk).error
            raise RuntimeError(f"portal request {pk} {status}: {error}")
        return status == "running"

    wait_for(running, timeout=INSTALL_TIMEOUT, what=f"request {pk} to run")
    seconds = time.monotonic() - start
    steps.append(_timeline(pk))
    _check_running(guest_uuid)
    ctx.made.remove(QEMU_URI, guest_uuid)
    console_log_path(guest_uuid).unlink(missing_ok=True)
    return seconds


def raw_run(ctx: Context, index: int, inside: list[dict[str, float]]) -> float:
    """The plain libvirt-python script (bench/raw_install.py) as its own process."""
    name = f"bench-raw{index}-{secrets.token_hex(2)}"
    ctx.made.file(CONSOLE_DIR / f"{name}.log")
    install_log = CONSOLE_DIR / f"{name}.install-console.log"
    final_log = CONSOLE_DIR / f"{name}.console.log"
    ctx.made.file(install_log)
    ctx.made.file(final_log)
    argv = [sys.executable, "-m", "bench.raw_install", "--uri", QEMU_URI, "--name", name]
    argv += ["--pool", "vmportal", "--kernel", KERNEL, "--initrd", INITRD]
    argv += ["--cmdline", _cmdline(), "--memory-mib", "256", "--disk-mib", str(_disk_mib())]
    argv += ["--domain-type", ctx.domain_type, "--install-log", str(install_log)]
    argv += ["--final-log", str(final_log)]
    start = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        _remove_by_name(ctx, name)
        raise RuntimeError(f"raw install failed:\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    uuid = report["uuid"]
    inside.append({k: round(v, 3) for k, v in report["phases"].items()})
    ctx.made.domain(QEMU_URI, uuid)
    _installed(install_log)
    _check_running(uuid)
    ctx.made.remove(QEMU_URI, uuid)
    return seconds


def virt_install_run(ctx: Context, index: int) -> float:
    """virt-install --install kernel=...,initrd=... --wait (it restarts phase 2 itself)."""
    from provisioning.hypervisor import operations
    from provisioning.hypervisor.connection import get_hypervisor

    name = f"bench-vi{index}-{secrets.token_hex(2)}"
    ctx.made.file(CONSOLE_DIR / f"{name}.log")
    log = CONSOLE_DIR / f"{name}.console.log"
    ctx.made.file(log)
    size_gib = _disk_mib() / 1024
    install = f"kernel={KERNEL},initrd={INITRD},kernel_args={_cmdline()},kernel_args_overwrite=yes"
    argv = ["virt-install", "--connect", QEMU_URI, "--name", name, "--memory", "256"]
    argv += ["--vcpus", "1", "--disk", f"pool=vmportal,size={size_gib},format=qcow2,bus=virtio"]
    argv += ["--install", install, "--virt-type", ctx.domain_type]
    argv += ["--osinfo", "detect=on,require=off", "--features", "acpi=on", "--graphics", "none"]
    argv += ["--network", "none", "--serial", f"pty,log.file={log},log.append=on"]
    argv += ["--noautoconsole", "--wait", str(int(INSTALL_TIMEOUT / 60))]
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT + 30)
    info = operations.find_by_name(get_hypervisor(QEMU_URI), name)
    seconds = time.monotonic() - start
    if info is not None:
        ctx.made.domain(QEMU_URI, info.uuid)
    if done.returncode != 0 or info is None or info.state.value != "running":
        if info is not None:
            ctx.made.remove(QEMU_URI, info.uuid)
        raise RuntimeError(f"virt-install failed:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}")
    _installed(log)
    ctx.made.remove(QEMU_URI, info.uuid)
    return seconds


def _timeline(pk: int) -> list[tuple[str, float]]:
    """When the request reached each status, in seconds after it was recorded."""
    from provisioning.models import ProvisioningRequest, RequestEvent

    created = ProvisioningRequest.objects.get(pk=pk).created
    return [
        (e.to_status, round((e.created - created).total_seconds(), 3))
        for e in RequestEvent.objects.filter(request_id=pk).order_by("created", "id")
    ]


def _check_running(uuid: str) -> None:
    from provisioning.hypervisor import operations
    from provisioning.hypervisor.connection import get_hypervisor

    info = operations.get_info(get_hypervisor(QEMU_URI), uuid)
    if info.state.value != "running":
        raise RuntimeError(f"phase 2 of {uuid} is {info.state.value}, not running")


def _remove_by_name(ctx: Context, name: str) -> None:
    from provisioning.hypervisor import operations
    from provisioning.hypervisor.connection import get_hypervisor

    info = operations.find_by_name(get_hypervisor(QEMU_URI), name)
    if info is not None:
        ctx.made.remove(QEMU_URI, info.uuid)


def run(ctx: Context) -> dict[str, Any]:
    """Interleaved runs of the three; the ratios of the medians."""
    runs = ctx.runs(1, 5)
    session = ctx.session("bench")
    times: dict[str, list[float]] = {"portal": [], "raw": [], "virt-install": []}
    steps: list[Any] = []
    inside: list[dict[str, float]] = []
    for index in range(runs):
        times["portal"].append(portal_run(ctx, session, index, steps))
        ctx.log(f"install run {index + 1}/{runs}: portal {times['portal'][-1]:.2f} s")
        times["raw"].append(raw_run(ctx, index, inside))
        ctx.log(f"install run {index + 1}/{runs}: raw {times['raw'][-1]:.2f} s")
        times["virt-install"].append(virt_install_run(ctx, index))
        ctx.log(f"install run {index + 1}/{runs}: virt-install {times['virt-install'][-1]:.2f} s")
    portal, raw, virt = (median(times[k]) for k in ("portal", "raw", "virt-install"))
    # Everything but the installer's own run (which swings by a second from run to run): up to
    # the installer starting, and from its power-off being seen to phase 2 running.
    portal_around = [dict(s)["waiting"] + dict(s)["running"] - dict(s)["defining"] for s in steps]
    raw_around = [p["installer_started"] + p["running"] - p["installer_stopped"] for p in inside]
    return {
        "figures": {"install_vs_raw": portal / raw, "install_vs_virt_install": portal / virt},
        "details": {
            "install_portal_median_s": portal,
            "install_raw_median_s": raw,
            "install_virt_install_median_s": virt,
            "install_seconds": times,
            "install_runs": runs,
            "install_portal_steps_s": steps,
            "install_raw_phases_s": inside,
            "install_around_installer_median_s": {
                "portal": median(portal_around),
                "raw": median(raw_around),
            },
        },
    }
