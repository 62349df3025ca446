"""Guests' consoles: the serial log (tailed for installs), and one-time tokens for browser consoles.

A page mints a token for one console of one guest (``mint_token``); the WebSocket that opens
the console spends it (``redeem_token``), once and before it expires, and the session is kept
as a row of the guest's console history until it ends (``session_ended``).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, User
from django.db import transaction
from django.utils import timezone

from provisioning.models import ConsoleSession, Guest, Host, Job, JobEvent, ProvisioningRequest
from provisioning.services import transitions

log = logging.getLogger(__name__)
POLL_EVERY = 0.5
MAX_CHUNK = 16 * 1024


def console_log_path(guest_uuid: object) -> Path:
    """Where a guest's serial console is logged on its host (chosen by the portal)."""
    return Path(settings.CONSOLE_LOG_DIR) / f"vmportal-{guest_uuid}.log"


# WebSocket close codes a console viewer gets, with the reason beside them (4000-4999 are ours).
TAKEN_OVER = 4001
BAD_ORIGIN = 4003
IDLE = 4008
NOT_SIGNED_IN = 4401
NO_SUCH_GUEST = 4404
NOT_RUNNING = 4409
BAD_TOKEN = 4410
UNAVAILABLE = 4500
# States a console can be opened in.
OPEN_STATES = (Guest.State.RUNNING, Guest.State.PAUSED)


class ConsoleRefused(Exception):
    """A console cannot be opened (or minted): a close code and the reason the viewer is shown."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Opened:
    """A console session that was let in: which guest, on which host, for whom."""

    session_id: int
    guest_id: int
    guest_uuid: str
    guest_name: str
    host_uri: str
    kind: str
    state: str


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _may_open(user: AbstractBaseUser | AnonymousUser, guest: Guest) -> bool:
    staff = bool(getattr(user, "is_staff", False))
    return bool(user.is_authenticated and (staff or guest.owner_id == user.pk))


def mint_token(*, guest: Guest, user: User, kind: str) -> str:
    """A token good once, for CONSOLE_TOKEN_SECONDS, to open `kind` of the guest's consoles."""
    if kind not in ConsoleSession.Kind.values:
        raise ConsoleRefused(NO_SUCH_GUEST, f"no console of kind {kind!r}")
    if not _may_open(user, guest):
        raise ConsoleRefused(NO_SUCH_GUEST, "no such guest")
    if guest.state not in OPEN_STATES:
        raise ConsoleRefused(NOT_RUNNING, f"{guest.name} is {guest.get_state_display().lower()}")
    now = timezone.now()
    # Tokens never used are kept only until they expire.
    ConsoleSession.objects.filter(user=user, opened__isnull=True, expires__lt=now).delete()
    token = secrets.token_urlsafe(32)
    ConsoleSession.objects.create(
        guest=guest,
        user=user,
        kind=kind,
        token_hash=_hash(token),
        expires=now + timedelta(seconds=settings.CONSOLE_TOKEN_SECONDS),
    )
    return token


def redeem_token(
    *, token: str, guest_uuid: str, kind: str, user: AbstractBaseUser | AnonymousUser, client: str
) -> Opened:
    """Spend a console token: the session it opens, or ConsoleRefused with the code to close."""
    if not user.is_authenticated:
        raise ConsoleRefused(NOT_SIGNED_IN, "sign in to open a console")
    guest = Guest.objects.select_related("host").filter(uuid=guest_uuid).first()
    if guest is None or not _may_open(user, guest):
        raise ConsoleRefused(NO_SUCH_GUEST, "no such guest")
    now = timezone.now()
    with transaction.atomic():
        row = (
            ConsoleSession.objects.select_for_update()
            .filter(token_hash=_hash(token or ""), guest=guest, user_id=user.pk, kind=kind)
            .first()
        )
        if row is None:
            raise ConsoleRefused(BAD_TOKEN, "unknown console token: reload the page")
        if row.opened is not None:
            raise ConsoleRefused(BAD_TOKEN, "this console token was used already")
        if row.expires <= now:
            raise ConsoleRefused(BAD_TOKEN, "this console token expired: reload the page")
        row.opened = now
        row.client = client[:64]
        if guest.state not in OPEN_STATES:
            row.closed = now
            row.close_reason = "refused: not running"
        row.save(update_fields=["opened", "client", "closed", "close_reason"])
    if guest.state not in OPEN_STATES:
        raise ConsoleRefused(
            NOT_RUNNING, f"{guest.name} is {guest.get_state_display().lower()}, not running"
        )
    return Opened(
        session_id=row.pk,
        guest_id=guest.pk,
        guest_uuid=str(guest.uuid),
        guest_name=guest.name,
        host_uri=guest.host.uri,
        kind=kind,
        state=guest.state,
    )


def session_ended(session_id: int, reason: str) -> None:
    """Note the end of a console session (the first end noted counts)."""
    ConsoleSession.objects.filter(pk=session_id, closed__isnull=True).update(
        closed=timezone.now(), close_reason=reason[:123]
    )


def guest_host_uri(guest_id: int) -> str | None:
    """The URI of the host the guest is on now (a migration moves it), or None if it is gone."""
    row = Guest.objects.filter(pk=guest_id).values_list("host__uri", "state").first()
    if row is None or row[1] == Guest.State.UNDEFINED:
        return None
    return str(row[0])


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
