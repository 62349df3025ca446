"""throughput_vs_raw: provisions per second through the whole stack against a raw libvirt loop.

The portal: N new-guest forms POSTed over HTTP by four logged-in clients at once, each request
going through the worker (admit, disk, define, start) on libvirt's test driver, counted when the
database says `running`. The anchor: one libvirt-python connection making the same volume, the
same final domain XML, defineXML and create(), N times in a loop. Runs alternate; medians.
"""

from __future__ import annotations

import queue
import re
import threading
import time
import uuid as uuidlib
from typing import Any

from lxml import etree

from bench.common import median, wait_for
from bench.context import Context
from bench.stack import INITRD, KERNEL, TEST_POOL, TEST_URI

CLIENTS = 4


def portal_run(ctx: Context, sessions: list[Any], prefix: str, count: int) -> float:
    """Provisions per second: first POST to the last request running in the database."""
    from provisioning.models import ProvisioningRequest

    names: queue.Queue[str] = queue.Queue()
    for i in range(count):
        names.put(f"{prefix}-{i:04d}")
    pks: list[int] = []
    errors: list[str] = []
    template = ctx.seed.persistent.pk

    def client(session: Any) -> None:
        while True:
            try:
                name = names.get_nowait()
            except queue.Empty:
                return
            fields = {"name": name, "vcpus": "1", "memory_mib": "256", "disk_mib": "64"}
            answer = session.post(f"/guests/new?template={template}", fields)
            found = re.search(r"/requests/(\d+)/", answer.location)
            if answer.status != 302 or found is None:
                errors.append(f"{name}: HTTP {answer.status}")
                return
            pks.append(int(found.group(1)))

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"new-guest POSTs refused: {errors[:3]}")
    requests = ProvisioningRequest.objects.filter(pk__in=pks)

    def all_running() -> bool:
        failed = requests.filter(status__in=("failed", "cancelled")).first()
        if failed is not None:
            raise RuntimeError(f"request {failed.pk} {failed.status}: {failed.error}")
        return requests.filter(status="running").count() == count

    wait_for(all_running, timeout=600, what=f"{count} requests to run")
    seconds = time.monotonic() - start
    for uuid in requests.values_list("guest__uuid", flat=True):
        ctx.made.domain(TEST_URI, str(uuid))
    return count / seconds


def _volume_xml(name: str) -> str:
    root = etree.Element("volume")
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "capacity", unit="MiB").text = "64"
    etree.SubElement(root, "allocation", unit="bytes").text = "0"
    etree.SubElement(etree.SubElement(root, "target"), "format", type="qcow2")
    return etree.tostring(root, encoding="unicode")


def raw_run(ctx: Context, prefix: str, count: int) -> float:
    """Provisions per second of a plain libvirt-python loop doing the same calls."""
    import libvirt

    from provisioning.hypervisor import domxml

    conn = libvirt.open(TEST_URI)
    try:
        start = time.monotonic()
        pool = conn.storagePoolLookupByName(TEST_POOL)
        for i in range(count):
            name = f"{prefix}-{i:04d}"
            volume = f"{name}.qcow2"
            pool.createXML(_volume_xml(volume), 0)
            spec = domxml.GuestSpec(
                name=name,
                uuid=str(uuidlib.uuid4()),
                memory_mib=256,
                vcpus=1,
                method="kernel",
                domain_type="qemu",
                disks=(domxml.DiskSpec(domxml.VolumeRef(TEST_POOL, volume)),),
                media=domxml.BootMedia(kernel=KERNEL, initrd=INITRD, cmdline="console=ttyS0"),
            )
            dom = conn.defineXML(domxml.final_xml(spec))
            ctx.made.domain(TEST_URI, spec.uuid)
            dom.create()
        seconds = time.monotonic() - start
    finally:
        conn.close()
    return count / seconds


def _remove_made(ctx: Context) -> None:
    """Remove the domains of a run so the next starts from the same libvirt state."""
    for uuid in sorted(ctx.made.domains.get(TEST_URI, set())):
        ctx.made.remove(TEST_URI, uuid)


def _quiet(ctx: Context) -> None:
    """Wait until the portal has seen every removal (no event work left behind for the next run)."""
    from provisioning.models import Guest

    def settled() -> bool:
        return not Guest.objects.filter(host=ctx.seed.test).exclude(state="undefined").exists()

    wait_for(settled, timeout=120, what="the portal to see the removals", every=0.1)


def queries(ctx: Context) -> dict[str, Any]:
    """What one provision (form POST to running) costs the database, counted in this process."""
    from tests.support.cost import provision_cost

    template = ctx.seed.persistent
    cost = provision_cost(owner=ctx.seed.user, template=template, name="cost-warm")
    ctx.made.domain(TEST_URI, _uuid_of(cost.request_id))
    cost = provision_cost(owner=ctx.seed.user, template=template, name="cost-1")
    ctx.made.domain(TEST_URI, _uuid_of(cost.request_id))
    return {
        "queries_per_provision": cost.total,
        "queries_per_provision_web": cost.web,
        "queries_per_provision_worker": cost.worker,
        "queries_per_provision_listener": cost.listener,
        "transactions_per_provision": cost.transactions,
    }


def _uuid_of(request_id: int) -> str:
    from provisioning.models import ProvisioningRequest

    return str(ProvisioningRequest.objects.get(pk=request_id).guest.uuid)


def run(ctx: Context) -> dict[str, Any]:
    """Alternating runs of portal and raw; the ratio of the median rates."""
    counted = queries(ctx)
    _remove_made(ctx)
    runs, count = ctx.runs(1, 3), ctx.runs(40, 200)
    sessions = [ctx.session("bench") for _ in range(CLIENTS)]
    rates: dict[str, list[float]] = {"portal": [], "raw": []}
    for index in range(runs):
        rates["portal"].append(portal_run(ctx, sessions, f"tp{index}", count))
        _remove_made(ctx)
        _quiet(ctx)
        rates["raw"].append(raw_run(ctx, f"raw{index}", count))
        _remove_made(ctx)
        ctx.log(
            f"throughput run {index + 1}/{runs}: portal {rates['portal'][-1]:.1f}/s, "
            f"raw {rates['raw'][-1]:.1f}/s ({count} guests)"
        )
    portal, raw = median(rates["portal"]), median(rates["raw"])
    return {
        "figures": {
            "throughput_vs_raw": portal / raw,
            "queries_per_provision": counted["queries_per_provision"],
        },
        "details": {
            **counted,
            "throughput_portal_per_s": portal,
            "throughput_raw_per_s": raw,
            "throughput_rates": rates,
            "throughput_guests_per_run": count,
            "throughput_runs": runs,
            "throughput_http_clients": CLIENTS,
        },
    }
