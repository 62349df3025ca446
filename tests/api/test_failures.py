"""When the server itself fails under /api/, the answer is problem details too, and a new thing
made with 201 says where it lives."""

from __future__ import annotations

import pytest
from django.db import OperationalError
from django.test import Client

from provisioning.api import routes
from provisioning.models import ApiToken
from provisioning.services import tokens
from tests.factories import make_user, new_public_key

pytestmark = pytest.mark.django_db


def _client() -> Client:
    owner = make_user()
    secret = tokens.token_create(user=owner, name="t", scope=ApiToken.Scope.WRITE, days=1).secret
    return Client(raise_request_exception=False, headers={"Authorization": f"Bearer {secret}"})


@pytest.mark.parametrize(
    ("error", "status", "said"),
    [
        (RuntimeError("a bug"), 500, "The server failed to answer"),
        (OperationalError("database is locked"), 503, "The database is unavailable"),
    ],
)
def test_a_failure_inside_the_api_is_problem_details_not_a_page(
    monkeypatch: pytest.MonkeyPatch, error: Exception, status: int, said: str
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(routes.quotas, "usage_of", broken)
    response = _client().get("/api/v1/quota")
    assert response.status_code == status
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["detail"].startswith(said)
    assert body["instance"] == "/api/v1/quota"
    assert "a bug" not in body["detail"]  # a bug's own words stay in the log


def test_a_key_added_answers_201_with_where_it_lives_and_its_etag() -> None:
    client = _client()
    response = client.post(
        "/api/v1/keys",
        {"name": "desk", "public_key": new_public_key()},
        content_type="application/json",
    )
    assert response.status_code == 201
    location = response["Location"]
    assert location == response.json()["url"]
    again = client.get(location)
    assert again.status_code == 200
    assert again["ETag"] == response["ETag"]
