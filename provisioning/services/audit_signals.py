"""Logins, failed logins and logouts in the audit log (django.contrib.auth's signals).

The channel and address come from the origin of the request (a login under /admin/ is "admin").
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.http import HttpRequest

from provisioning.services import audit


def on_logged_in(
    sender: Any, request: HttpRequest | None, user: AbstractBaseUser, **_: Any
) -> None:
    """A login, by the user who logged in."""
    audit.record("login", user, by=user)


def on_login_failed(
    sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **_: Any
) -> None:
    """A refused login: nobody is its actor, the name tried is its detail."""
    tried = str(credentials.get(get_user_model().USERNAME_FIELD, ""))[:150]
    here = audit.origin()
    ip = request.META.get("REMOTE_ADDR") if request is not None else here.ip
    # No actor even when someone is logged in already: the name tried is not proven.
    with audit.acting(here.channel, ip=ip):
        audit.record(
            "login_failed",
            result=audit.Result.REFUSED,
            detail=f"username tried: {tried}",
        )


def on_logged_out(
    sender: Any, request: HttpRequest | None, user: AbstractBaseUser | None, **_: Any
) -> None:
    """A logout (nothing when nobody was logged in)."""
    if user is not None:
        audit.record("logout", user, by=user)
