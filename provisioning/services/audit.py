"""The audit log: one append-only row per state-changing action, login and refusal.

Who acted and through what (the pages, the API with its token, the admin, a schedule, the
reconcile pass, the event listener) is set once where the work enters the portal, with
`acting(...)`, and every service that changes something calls `record(...)`. A row written in the
action's own transaction goes or stays with it; a refusal is written on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import models
from django.utils import timezone

from provisioning.models import ApiToken, AuditEvent, IdempotencyKey

Channel = AuditEvent.Channel
Result = AuditEvent.Result
AnyUser = AbstractBaseUser | AnonymousUser | None
# A user to find only when a row needs one: a page's request.user costs a session query, and
# most requests record nothing.
LazyUser = Callable[[], AnyUser]


@dataclass(frozen=True)
class Origin:
    """Where the work in hand came from."""

    channel: str = Channel.SYSTEM
    user: AbstractBaseUser | None = None
    ip: str | None = None
    token: ApiToken | None = None
    find_user: LazyUser | None = dataclasses.field(default=None, repr=False, compare=False)


_origin: ContextVar[Origin | None] = ContextVar("vmportal_audit_origin", default=None)
# What a process records as when nothing entered through `acting` (a worker says "worker").
_default = Origin()


def set_process_channel(channel: str) -> None:
    """The channel of this process's rows outside any `acting` block."""
    global _default
    _default = Origin(channel=channel)


@contextlib.contextmanager
def acting(
    channel: str,
    *,
    user: AnyUser | LazyUser = None,
    ip: str | None = None,
    token: ApiToken | None = None,
) -> Iterator[Origin]:
    """Within the block, rows are recorded as coming through `channel` from `user`.

    `user` may be a function returning the user, called only when a row is recorded.
    """
    if callable(user):
        origin = Origin(channel=channel, ip=_ip_or_none(ip), token=token, find_user=user)
    else:
        origin = Origin(channel=channel, user=_user_or_none(user), ip=_ip_or_none(ip), token=token)
    reset = _origin.set(origin)
    try:
        yield origin
    finally:
        _origin.reset(reset)


def origin() -> Origin:
    """The origin in hand, with its user found by now."""
    here = _origin.get() or _default
    if here.find_user is None:
        return here
    return dataclasses.replace(here, user=_user_or_none(here.find_user()), find_user=None)


def set_user(user: AbstractBaseUser | AnonymousUser | None, token: ApiToken | None = None) -> None:
    """Name the user (and token) once authentication has found them, within `acting(...)`."""
    current = origin()
    _origin.set(
        Origin(channel=current.channel, user=_user_or_none(user), ip=current.ip, token=token)
    )


def _user_or_none(user: Any) -> AbstractBaseUser | None:
    if user is None or isinstance(user, AnonymousUser) or not getattr(user, "pk", None):
        return None
    return user  # type: ignore[no-any-return]


def _ip_or_none(ip: str | None) -> str | None:
    try:
        return str(ipaddress.ip_address(ip)) if ip else None
    except ValueError:
        return None


def describe(obj: models.Model | None) -> dict[str, str]:
    """The object columns of a row about `obj`."""
    if obj is None:
        return {}
    ident = getattr(obj, "uuid", None) or obj.pk
    return {
        "object_type": obj._meta.model_name or "",
        "object_id": str(ident or ""),
        "object_repr": str(obj)[:200],
    }


def record(
    action: str,
    obj: models.Model | None = None,
    *,
    by: AbstractBaseUser | AnonymousUser | None = None,
    result: str = Result.OK,
    changes: Mapping[str, tuple[Any, Any] | list[Any]] | None = None,
    detail: str = "",
    channel: str | None = None,
    object_repr: str = "",
) -> AuditEvent:
    """Add one row: `action` ("guest.suspend", "login", ...) on `obj`, by `by` or the origin."""
    here = origin()
    actor = _user_or_none(by) or here.user
    columns = describe(obj)
    if object_repr:
        columns["object_repr"] = object_repr[:200]
    return AuditEvent.objects.create(
        actor=actor,  # type: ignore[misc]  # any user model's row; the field is the project's
        actor_name=(actor.get_username() if actor is not None else "")[:150],
        channel=channel or here.channel,
        token=here.token,
        token_name=here.token.name if here.token is not None else "",
        source_ip=here.ip,
        action=action[:40],
        changes={k: list(v) for k, v in (changes or {}).items()},
        result=result,
        detail=detail,
        **columns,
    )


def refused(
    action: str,
    obj: models.Model | None,
    reason: str,
    *,
    by: AbstractBaseUser | AnonymousUser | None = None,
    object_repr: str = "",
) -> AuditEvent:
    """Add the row of an action refused (quota, permission, wrong state), with the reason."""
    return record(action, obj, by=by, result=Result.REFUSED, detail=reason, object_repr=object_repr)


def changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The fields whose value differs, as {field: (before, after)} with JSON-able values."""
    return {
        key: (_plain(before.get(key)), _plain(after.get(key)))
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    }


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def prune(*, days: int) -> int:
    """Remove rows older than `days` days (the retention setting); how many went."""
    cutoff = timezone.now() - timedelta(days=days)
    deleted, _ = AuditEvent.objects.filter(created__lt=cutoff).delete()
    return deleted


def prune_idempotency_keys(*, hours: int) -> int:
    """Remove Idempotency-Key rows older than `hours` hours; how many went."""
    cutoff = timezone.now() - timedelta(hours=hours)
    deleted, _ = IdempotencyKey.objects.filter(created__lt=cutoff).delete()
    return deleted
