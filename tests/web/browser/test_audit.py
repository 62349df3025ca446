"""The audit log through the real web server (ASGI): a browser login, the page, the CSV stream."""

from __future__ import annotations

import csv
import io
import re

import pytest
from playwright.sync_api import Page, expect

from tests.factories import PASSWORD
from tests.support.browser import log_in

pytestmark = pytest.mark.browser


def test_staff_find_their_login_on_the_audit_page_and_in_the_csv(
    stack, make_user, page: Page
) -> None:
    make_user("root", staff=True)
    stack.start("web")
    log_in(page, stack.base_url, "root", "not-the-password")
    log_in(page, stack.base_url, "root", PASSWORD)
    page.get_by_role("link", name="Audit log").click()
    expect(page.get_by_role("heading", name="Audit log")).to_be_visible()
    rows = page.locator("table.audit tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0).locator("code")).to_have_text("login")
    expect(rows.nth(1).locator("code")).to_have_text("login_failed")
    page.get_by_label("Result").select_option("refused")
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(1)
    expect(page).to_have_url(re.compile(r"/audit/\?.*result=refused"))  # htmx pushed it
    export = page.get_by_role("link", name="Export CSV").get_attribute("href")
    response = page.request.get(f"{stack.base_url}{export}")
    assert response.status == 200 and response.headers["content-type"] == "text/csv"
    _header, *lines = list(csv.reader(io.StringIO(response.text())))
    assert [(line[2], line[4], line[5], line[9]) for line in lines] == [
        ("web", "127.0.0.1", "login_failed", "refused")
    ]
