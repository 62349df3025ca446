"""Personal API tokens: made (and shown) once, found by their hash, revoked by their owner."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, User
from django.db import IntegrityError, transaction
from django.utils import timezone

from provisioning.models import ApiToken
from provisioning.services import audit

PREFIX = "vmp_"
NAME_MAX = ApiToken._meta.get_field("name").max_length or 100
# How often last_used is written: every use would make each API call a write.
LAST_USED_EVERY = timedelta(seconds=60)


class TokenError(ValueError):
    """A token that cannot be made, with the form field the message is for."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


@dataclass(frozen=True)
class Made:
    token: ApiToken
    secret: str  # the whole token: shown once, never stored


def digest_of(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def token_create(*, user: User, name: str, scope: str, days: int) -> Made:
    """A new token for `user`, valid `days` days, read or read-write."""
    name = " ".join(name.split())
    if not name:
        raise TokenError("name", "Give the token a name.")
    if len(name) > NAME_MAX:
        raise TokenError("name", f"Use at most {NAME_MAX} characters.")
    if scope not in ApiToken.Scope.values:
        raise TokenError("scope", "Pick read or read-write.")
    if not 1 <= days <= settings.API_TOKEN_MAX_DAYS:
        raise TokenError("days", f"Pick 1 to {settings.API_TOKEN_MAX_DAYS} days.")
    secret = PREFIX + secrets.token_urlsafe(32)
    try:
        with transaction.atomic():
            token = ApiToken.objects.create(
                user=user,
                name=name,
                prefix=secret[: len(PREFIX) + 6],
                digest=digest_of(secret),
                scope=scope,
                expires=timezone.now() + timedelta(days=days),
            )
            audit.record(
                "api_token.create",
                token,
                by=user,
                changes={"scope": (None, scope), "expires": (None, token.expires.isoformat())},
            )
    except IntegrityError:
        raise TokenError("name", f"You have a token named “{name}” already.") from None
    return Made(token=token, secret=secret)


def token_revoke(
    *, user: User, token_id: int, by: AbstractBaseUser | AnonymousUser | None = None
) -> ApiToken:
    """Revoke one of the user's tokens (ApiToken.DoesNotExist when it is not theirs or gone);
    `by` is who does it when not its owner (staff, in the admin)."""
    actor = by or user
    with transaction.atomic():
        token = ApiToken.objects.select_for_update().get(
            user=user, pk=token_id, revoked__isnull=True
        )
        token.revoked = timezone.now()
        token.save(update_fields=["revoked"])
        detail = "" if actor.pk == user.pk else f"of {user}"
        audit.record("api_token.revoke", token, by=actor, detail=detail)
    return token


class TokenRefused(Exception):
    """Why a presented token does not authenticate (unknown, revoked or expired)."""


def token_authenticate(*, secret: str, client: str) -> ApiToken:
    """The live token behind `secret` (its user loaded); TokenRefused when there is none."""
    if not secret.startswith(PREFIX) or len(secret) > 200:
        raise TokenRefused("unknown token")
    token = ApiToken.objects.select_related("user").filter(digest=digest_of(secret)).first()
    if token is None or not token.user.is_active:
        raise TokenRefused("unknown token")
    now = timezone.now()
    if token.revoked is not None:
        raise TokenRefused("this token was revoked")
    if token.expires <= now:
        raise TokenRefused("this token has expired")
    if (
        token.last_used is None
        or now - token.last_used >= LAST_USED_EVERY
        or (token.last_used_from != client[:64])
    ):
        ApiToken.objects.filter(pk=token.pk).update(last_used=now, last_used_from=client[:64])
        token.last_used, token.last_used_from = now, client[:64]
    return token
