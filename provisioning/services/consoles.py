"""The serial console of guests being installed: tailed from its log file and published."""

from __future__ import annotations

import logging
from pathlib import Path

from django.conf import settings

from provisioning.models import Host, Job, JobEvent, ProvisioningRequest
from provisioning.services import transitions

log = logging.getLogger(__name__)
POLL_EVERY = 0.5
MAX_CHUNK = 16 * 1024


def console_log_path(guest_uuid: object) -> Path:
    """Where a guest's serial console is logged on its host (chosen by the portal)."""
    return Path(settings.CONSOLE_LOG_DIR) / f"vmportal-{guest_uuid}.log"


def console_tail(guest_uuid: object, *, max_bytes: int = 4096) -> str:
    """The last bytes of a guest's console log, for pages (empty when there is none)."""
    path = console_log_path(guest_uuid)
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


class ConsoleTailer:
    """Follows the console logs of installs on the given hosts, one poll at a time."""

    def __init__(self, hosts: list[Host]) -> None:
        self.host_ids = [h.pk for h in hosts]
        self.offsets: dict[int, int] = {}

    def poll(self) -> None:
        # One query for every install and its (first) provisioning job: with hundreds of
        # installs waiting, a query per install every half second kept the listener busy.
        active = (
            ProvisioningRequest.objects.filter(
                host_id__in=self.host_ids,
                status__in=ProvisioningRequest.INSTALLER_RUNS,
                jobs__kind__in=Job.FOR_REQUESTS,
            )
            .order_by("pk", "jobs__pk")
            .values_list("pk", "guest__uuid", "jobs__pk")
        )
        seen: set[int] = set()
        for request_id, guest_uuid, job in active:
            if request_id not in seen:
                seen.add(request_id)
                self._follow(request_id, job, console_log_path(guest_uuid))
        for gone in set(self.offsets) - seen:
            del self.offsets[gone]

    def _follow(self, request_id: int, job_id: int, path: Path) -> None:
        try:
            with path.open("rb") as f:
                size = f.seek(0, 2)
                offset = self.offsets.get(request_id, 0)
                if size < offset:
                    offset = 0  # the log was recreated
                if size == offset:
                    return
                f.seek(offset)
                chunk = f.read(MAX_CHUNK)
        except OSError:
            return
        self.offsets[request_id] = offset + len(chunk)
        text = chunk.decode("utf-8", errors="replace")
        transitions.job_log(job_id, text, kind=JobEvent.Kind.CONSOLE)
