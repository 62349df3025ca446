"""Provisioning: from a user's request to a running guest.

- `submit`: making a request (a new guest, or a rebuild), checked, placed and queued;
- `spec`: what the request asks of libvirt (its disks, the domain XML of both phases);
- `steps`: the idempotent steps from admission to a running guest (`advance`);
- `ending`: the installer's end, failure, cancel, clean-up, and reconcile of missed events.
"""

from provisioning.services.provision.ending import (
    cancel,
    cleanup,
    enqueue_advance,
    fail,
    reconcile_requests,
    request_domain_stopped,
)
from provisioning.services.provision.spec import Plan, StepFailed, plan_of, template_at
from provisioning.services.provision.steps import CRASH_POINTS, STEPS, Later, advance
from provisioning.services.provision.submit import (
    Overrides,
    SubmitError,
    rebuild_submit,
    request_place,
    request_submit,
)

__all__ = [
    "CRASH_POINTS",
    "STEPS",
    "Later",
    "Overrides",
    "Plan",
    "StepFailed",
    "SubmitError",
    "advance",
    "cancel",
    "cleanup",
    "enqueue_advance",
    "fail",
    "plan_of",
    "rebuild_submit",
    "reconcile_requests",
    "request_domain_stopped",
    "request_place",
    "request_submit",
    "template_at",
]
