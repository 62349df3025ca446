"""Logging in through a real browser, and who may reach the admin."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.factories import PASSWORD
from tests.support.browser import log_in

pytestmark = pytest.mark.browser


def test_a_user_logs_in_and_sees_their_empty_dashboard(stack, make_user, page: Page) -> None:
    make_user("alice")
    stack.start("web")
    log_in(page, stack.base_url, "alice", PASSWORD)
    expect(page.get_by_role("heading", name="My guests")).to_be_visible()
    expect(page.get_by_text("You have no guests yet.")).to_be_visible()
    expect(page.get_by_role("link", name="Admin")).to_have_count(0)
    page.goto(f"{stack.base_url}/admin/")
    expect(page).to_have_url(f"{stack.base_url}/admin/login/?next=/admin/")


def test_a_wrong_password_is_refused_with_a_clear_message(stack, make_user, page: Page) -> None:
    make_user("alice")
    stack.start("web")
    log_in(page, stack.base_url, "alice", "not-the-password")
    expect(page.get_by_text("didn't match")).to_be_visible()
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()


def test_staff_log_in_and_reach_the_admin(stack, make_user, page: Page) -> None:
    make_user("root-admin", superuser=True)
    stack.start("web")
    log_in(page, stack.base_url, "root-admin", PASSWORD)
    expect(page.get_by_role("heading", name="All guests")).to_be_visible()
    page.get_by_role("link", name="Admin").click()
    expect(page.get_by_role("link", name="Guest templates")).to_be_visible()
    page.get_by_role("link", name="Hosts").click()
    expect(page.get_by_role("heading", name="Select host to change")).to_be_visible()
