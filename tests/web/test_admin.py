"""The admin is for staff only, and every model's pages work."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from provisioning import models

pytestmark = pytest.mark.django_db
MODELS = [
    models.Host,
    models.StoragePool,
    models.Network,
    models.Media,
    models.GuestTemplate,
    models.Guest,
    models.ProvisioningRequest,
    models.Job,
    models.Quota,
    models.RebuildSchedule,
    models.ScheduleRun,
    models.TemplateVersion,
]


def test_anonymous_visitors_are_sent_to_the_admin_login() -> None:
    response = Client().get("/admin/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


def test_a_user_who_is_not_staff_cannot_reach_the_admin(user_client: Client) -> None:
    response = user_client.get("/admin/provisioning/host/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_admins_can_list_search_and_add_each_model(superuser_client: Client, model) -> None:
    meta = model._meta
    changelist = reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist")
    assert superuser_client.get(changelist).status_code == 200
    assert superuser_client.get(changelist, {"q": "nothing-matches"}).status_code == 200
    add = reverse(f"admin:{meta.app_label}_{meta.model_name}_add")
    assert superuser_client.get(add).status_code == 200


def test_staff_without_permissions_see_no_models(staff_client: Client) -> None:
    response = staff_client.get("/admin/provisioning/host/")
    assert response.status_code == 403
