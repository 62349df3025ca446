"""The API tokens page: users make tokens (shown once, kept as a hash), list and revoke them."""

from __future__ import annotations

import hashlib

import pytest
from django.test import Client

from provisioning.models import ApiToken, AuditEvent
from provisioning.services import tokens
from tests.factories import make_user

pytestmark = pytest.mark.django_db
TOKENS = "/profile/tokens/"


def make(client: Client, name: str = "ci", scope: str = "read", days: int = 30):
    return client.post(TOKENS, {"name": name, "scope": scope, "days": days})


def test_anonymous_visitors_are_sent_to_log_in() -> None:
    for response in (Client().get(TOKENS), Client().post(f"{TOKENS}1/revoke")):
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/?next=/profile/tokens/")


def test_the_nav_links_to_the_tokens_page_beside_the_keys(user_client: Client) -> None:
    body = user_client.get("/").content.decode()
    assert 'href="/profile/keys/">SSH keys</a>\n      <a href="/profile/tokens/">' in body


def test_the_form_offers_read_or_write_and_90_days_of_at_most_the_setting(
    user_client: Client, settings
) -> None:
    settings.API_TOKEN_MAX_DAYS = 120
    body = user_client.get(TOKENS).content.decode()
    assert 'value="read"' in body and 'value="write"' in body
    assert 'value="90"' in body and 'max="120"' in body


def test_a_new_token_is_shown_once_and_only_its_hash_is_kept(user_client: Client, user) -> None:
    response = make(user_client, "deploy bot", "write", 30)
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    secret = response.context["made"].secret
    body = response.content.decode()
    assert secret.startswith("vmp_") and secret in body
    token = ApiToken.objects.get()
    assert (token.user, token.name, token.scope) == (user, "deploy bot", "write")
    assert token.digest == hashlib.sha256(secret.encode()).hexdigest()
    assert secret.startswith(token.prefix) and len(token.prefix) < len(secret)
    stored = [str(v) for v in ApiToken.objects.values_list().get()]
    assert secret not in stored
    # Nowhere later: not on the next page, not in the session, not in the audit log.
    again = user_client.get(TOKENS).content.decode()
    assert secret not in again and f"{token.prefix}…" in again
    assert secret not in str(dict(user_client.session))
    assert secret not in str(list(AuditEvent.objects.values()))


def test_a_used_name_is_a_field_error_and_makes_nothing(user_client: Client) -> None:
    make(user_client, "ci")
    response = make(user_client, "ci")
    assert response.status_code == 400
    assert "You have a token named “ci” already." in response.content.decode()
    assert response.context["made"] is None
    assert ApiToken.objects.count() == 1


@pytest.mark.parametrize("days", [0, 366, "soon"])
def test_days_out_of_range_are_a_field_error(user_client: Client, days, settings) -> None:
    settings.API_TOKEN_MAX_DAYS = 365
    response = make(user_client, days=days)
    assert response.status_code == 400
    assert response.context["form"].errors["days"]
    assert not ApiToken.objects.exists()


def test_the_list_shows_scope_expiry_and_last_use(user_client: Client, user) -> None:
    made = tokens.token_create(user=user, name="ci", scope="read", days=7)
    tokens.token_authenticate(secret=made.secret, client="198.51.100.7")
    body = user_client.get(TOKENS).content.decode()
    assert "Read only" in body and "from 198.51.100.7" in body
    assert made.token.expires.strftime("%Y-%m-%d") in body
    assert 'aria-label="Revoke ci"' in body


def test_revoking_stops_the_token_and_says_so(user_client: Client, user) -> None:
    made = tokens.token_create(user=user, name="ci", scope="read", days=7)
    response = user_client.post(f"{TOKENS}{made.token.pk}/revoke", follow=True)
    assert response.status_code == 200
    assert "Revoked the token ci." in response.content.decode()
    made.token.refresh_from_db()
    assert made.token.revoked is not None
    assert 'aria-label="Revoke ci"' not in response.content.decode()
    with pytest.raises(tokens.TokenRefused):
        tokens.token_authenticate(secret=made.secret, client="198.51.100.7")


def test_another_users_token_is_404_and_stays(user_client: Client) -> None:
    other = tokens.token_create(user=make_user("mallory"), name="m", scope="write", days=7)
    assert user_client.post(f"{TOKENS}{other.token.pk}/revoke").status_code == 404
    assert user_client.post(f"{TOKENS}999999/revoke").status_code == 404
    other.token.refresh_from_db()
    assert other.token.revoked is None
    assert "m" not in [t.name for t in user_client.get(TOKENS).context["tokens"]]


def test_revoking_needs_a_post(user_client: Client, user) -> None:
    made = tokens.token_create(user=user, name="ci", scope="read", days=7)
    assert user_client.get(f"{TOKENS}{made.token.pk}/revoke").status_code == 405
