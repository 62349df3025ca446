"""An unattended install from a per-guest answer file, on real QEMU.

The tiny guest's installer reads vmportal.answer_url= from its command line, brings its NIC up
with DHCP, fetches the file with busybox wget and writes it to the disk; the installed guest
prints it on its serial console. The guest's network exists only in a network namespace of this
run (the namespaced libvirtd); the portal answers there through a port that leads, inside the
namespace, to a UNIX socket a second web server of the test listens on. No packet leaves it.
"""

# ruff: noqa: F811 - the tests take the fixture imported below as an argument

from __future__ import annotations

import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioning import cloudinit, sshkeys
from provisioning.demo import tinyguest
from provisioning.hypervisor import networks, operations, storage
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.hypervisor.errors import HypervisorError
from provisioning.models import (
    AnswerFile,
    GuestTemplate,
    Job,
    JobEvent,
    Network,
    ProvisioningRequest,
)
from provisioning.services.demo import DEMO_POOL_NAME, DEMO_POOL_PATH, demo_seed
from provisioning.services.provision import Overrides, request_submit
from tests.factories import make_host, make_user, new_public_key
from tests.support.flows import new_name, remove_qemu_guest
from tests.support.isolation import SCRIPT
from tests.support.netns import NetnsHost
from tests.support.qemu import free_subnet
from tests.support.qemu_engine import QemuStack, qemu_stack, wait_for_status  # noqa: F401
from tests.support.stack import (
    ROOT,
    VENV_BIN,
    Proc,
    RedisServer,
    Stack,
    point_celery_at,
    start_listener,
    start_worker,
    wait_until,
)

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]
ANSWER = """# answer file for {{ name }}
hostname {{ name }}
uuid {{ uuid }}
{% for key in ssh_keys %}authorized-key {{ key }}
{% endfor %}"""
Status = ProvisioningRequest.Status


@pytest.fixture
def answered(
    transactional_db: None, own_redis: RedisServer, settings, netns_host: NetnsHost, tmp_path: Path
) -> Iterator[tuple[Stack, GuestTemplate, list[str]]]:
    from vmportal.celery import app

    hv = get_hypervisor(netns_host.uri)
    host = make_host("local", uri=netns_host.uri, pool=None)
    subnet = free_subnet(hv)
    gateway = str(next(subnet.hosts()))
    net = new_name("vmportal-ans-")
    networks.ensure_network(hv, net, bridge=f"vpa{secrets.token_hex(3)}", subnet=subnet, nat=False)
    network = Network.objects.create(host=host, name=net, source=net)
    port = 8000 + secrets.randbelow(1000)
    base = f"http://{gateway}:{port}"
    settings.REDIS_URL = own_redis.url
    settings.LIBVIRT_URI = netns_host.uri
    settings.VMPORTAL_DOMAIN_TYPE = "qemu"
    settings.ANSWER_BASE_URL = base
    previous = app.conf.broker_url
    point_celery_at(own_redis.url)
    stack = Stack(own_redis, netns_host.uri)
    stack.env.update(VMPORTAL_DOMAIN_TYPE="qemu", VMPORTAL_ANSWER_BASE_URL=base)
    demo = demo_seed(host=host, log=print)
    template = GuestTemplate.objects.create(
        name="Tiny Linux (answer file)",
        method=GuestTemplate.Method.KERNEL,
        media=demo.media,
        pool=demo.pool,
        network=network,
        answer_file=ANSWER,
        kernel_cmdline=tinyguest.install_cmdline("answered") + " vmportal.answer_url={answer_url}",
        memory_mib_default=256,
        disk_mib_default=tinyguest.DISK_MIN_MIB,
        disk_mib_min=tinyguest.DISK_MIN_MIB,
        install_timeout_minutes=5,
    )
    template.full_clean()
    sock = str(tmp_path / "web.sock")
    names: list[str] = []
    forward: subprocess.Popen[bytes] | None = None
    try:
        web = Proc(
            "web-uds",
            [str(VENV_BIN / "uvicorn"), "vmportal.asgi:application", "--uds", sock],
            stack.env,
        )
        stack.procs["web"] = web
        stack.procs["worker"] = start_worker(stack.env)
        stack.procs["listener"] = start_listener(stack.env)
        wait_until(lambda: Path(sock).exists(), timeout=30, what="the web server's socket")
        forward = subprocess.Popen(
            [str(SCRIPT), "netns-exec", str(netns_host.dir), "--", sys.executable, "-m",
             "tests.support.forward", gateway, str(port), sock],
            cwd=ROOT,
        )  # fmt: skip
        yield stack, template, names
    finally:
        if forward is not None:
            forward.terminate()
            forward.wait(10)
        stack.stop()
        point_celery_at(previous)
        for name in names:
            remove_qemu_guest(hv, name, DEMO_POOL_NAME)

        def drop(conn) -> None:  # type: ignore[no-untyped-def]
            found = conn.networkLookupByName(net)
            if found.isActive():
                found.destroy()
            found.undefine()

        hv.call(drop, idempotent=False)


def console_of(guest) -> str:  # type: ignore[no-untyped-def]
    from provisioning.services.consoles import console_log_path

    try:
        return console_log_path(guest.uuid).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def test_the_installer_fetches_its_own_answer_file_once_and_the_guest_shows_it(
    answered: tuple[Stack, GuestTemplate, list[str]],
) -> None:
    _stack, template, names = answered
    key = new_public_key(comment="ann@laptop")
    name = new_name("vmportal-ans-")
    names.append(name)
    request = request_submit(
        owner=make_user("ann"), template=template, overrides=Overrides(name=name, ssh_keys=[key])
    )
    guest = request.guest
    assert guest is not None

    def printed() -> str | None:
        found = re.search(
            r"VMPORTAL-ANSWER-BEGIN\r?\n(.*?)\r?\nVMPORTAL-ANSWER-END", console_of(guest), re.S
        )
        return found.group(1) if found else None

    text = wait_until(printed, timeout=240, what="the installed guest to print its answer file")
    request.refresh_from_db()
    assert request.status == Status.RUNNING, request.error
    lines = text.replace("\r", "").splitlines()
    assert f"hostname {name}" in lines and f"uuid {guest.uuid}" in lines
    keys = [
        line.removeprefix("authorized-key ") for line in lines if line.startswith("authorized-key")
    ]
    assert [sshkeys.parse(k).fingerprint for k in keys] == [sshkeys.parse(key).fingerprint]
    answer = AnswerFile.objects.get(request=request)
    assert answer.fetched is not None
    job = Job.objects.get(request=request)
    logged = job.events.filter(kind=JobEvent.Kind.LOG, message__startswith="The installer fetched")
    assert logged.count() == 1
    # After the install the token is dead.
    from django.test import Client

    assert Client().get(f"/install/{answer.token}/").status_code == 410


def test_an_oemdrv_cd_rom_carries_the_answer_file_for_the_install_only(
    qemu_stack: QemuStack,
) -> None:
    # No network at all: the file is on a CD-ROM labelled OEMDRV in the install phase.
    demo = qemu_stack.template
    template = GuestTemplate.objects.create(
        name="Tiny Linux (answer file on OEMDRV)",
        method=GuestTemplate.Method.KERNEL,
        media=demo.media,
        pool=demo.pool,
        answer_file=ANSWER,
        answer_delivery=GuestTemplate.AnswerDelivery.OEMDRV,
        kernel_cmdline=tinyguest.install_cmdline("oemdrv") + " vmportal.answer=oemdrv",
        memory_mib_default=256,
        disk_mib_default=tinyguest.DISK_MIN_MIB,
        disk_mib_min=tinyguest.DISK_MIN_MIB,
        install_timeout_minutes=5,
    )
    template.full_clean()
    key = new_public_key(comment="bo@desk")
    request = request_submit(
        owner=qemu_stack.owner,
        template=template,
        overrides=Overrides(name=qemu_stack.new_name(), ssh_keys=[key]),
    )
    guest = request.guest
    assert guest is not None
    volume = f"{guest.name}-{guest.uuid.hex[:8]}-oemdrv.iso"

    def installing_with_it() -> bool:
        try:
            xml = operations.get_xml(qemu_stack.hv, str(guest.uuid))
        except HypervisorError:
            return False
        return volume in xml and "vmportal.answer=oemdrv" in xml

    wait_until(installing_with_it, timeout=60, what="the install boot with the OEMDRV CD-ROM")
    image = (DEMO_POOL_PATH / volume).read_bytes()  # the pool is a folder on this machine
    assert cloudinit.read_seed_iso(image)[""] == b"OEMDRV"

    def printed() -> str | None:
        found = re.search(
            r"VMPORTAL-ANSWER-BEGIN\r?\n(.*?)\r?\nVMPORTAL-ANSWER-END", console_of(guest), re.S
        )
        return found.group(1) if found else None

    text = wait_until(printed, timeout=240, what="the installed guest to print its answer file")
    lines = text.replace("\r", "").splitlines()
    assert f"hostname {guest.name}" in lines and f"authorized-key {key}" in lines
    wait_for_status(request, Status.RUNNING, qemu_stack, timeout=60)
    final = operations.get_xml(qemu_stack.hv, str(guest.uuid))
    assert volume not in final, "the installed guest has no OEMDRV CD-ROM"
    assert volume not in [v.name for v in storage.list_volumes(qemu_stack.hv, DEMO_POOL_NAME)]
