"""A request goes from pending to running through a real worker, Redis and libvirt's test driver."""

from __future__ import annotations

from provisioning.hypervisor import operations
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.models import GuestTemplate, Host, ProvisioningRequest
from provisioning.services.provision import Overrides, request_submit
from tests.support.engine import status_of
from tests.support.stack import wait_until

Status = ProvisioningRequest.Status


def test_a_kernel_install_waits_for_the_installer_then_runs(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    stack.start("worker", "listener")
    owner = make_user("ann")
    request = request_submit(
        owner=owner, template=kernel_template, overrides=Overrides(name="web1")
    )
    wait_until(lambda: status_of(request) == Status.WAITING, timeout=30, what="waiting")
    hv = get_hypervisor(test_host.uri)
    uuid = str(request.guest.uuid)
    info = operations.get_info(hv, uuid)
    assert info.active and info.persistent  # the final config is defined from the first second
    operations.shutdown(hv, uuid)  # the test driver applies on_poweroff: "the installer finished"
    wait_until(lambda: status_of(request) == Status.RUNNING, timeout=30, what="running")
    request.guest.refresh_from_db()
    assert request.guest.state == "running"
    assert "<kernel>" not in operations.get_xml(hv, uuid)
    assert [e.to_status for e in request.events.all()] == [
        "admitted",
        "preparing",
        "installing",
        "waiting",
        "defining",
        "starting",
        "running",
    ]
