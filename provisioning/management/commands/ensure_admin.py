"""Creates the first admin user when there is none (password from DJANGO_SUPERUSER_PASSWORD)."""

from __future__ import annotations

import os
import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the admin user if no superuser exists; print a generated password once."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--username", default=os.environ.get("DJANGO_SUPERUSER_USERNAME", "admin")
        )

    def handle(self, *args: Any, username: str, **options: Any) -> None:
        users = get_user_model()
        if users.objects.filter(is_superuser=True).exists():
            self.stdout.write("admin: a superuser exists already")
            return
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD", "")
        generated = not password
        if generated:
            password = secrets.token_urlsafe(12)
        users.objects.create_superuser(username=username, email="", password=password)
        if generated:
            self.stdout.write(
                self.style.WARNING(
                    f"admin: created user '{username}' with password {password} "
                    "(shown only this once; set DJANGO_SUPERUSER_PASSWORD to choose one)"
                )
            )
        else:
            self.stdout.write(
                f"admin: created user '{username}' (password from DJANGO_SUPERUSER_PASSWORD)"
            )
