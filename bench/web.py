"""A logged-in browser session over plain HTTP (cookies and CSRF), without following redirects."""

from __future__ import annotations

import http.cookiejar
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.message import Message
from typing import Any

_CSRF_INPUT = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hand 3xx answers back to the caller: the Location is what the benchmarks need."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass
class Answer:
    """One HTTP answer."""

    status: int
    headers: Message
    body: str

    @property
    def location(self) -> str:
        return self.headers.get("Location", "")


class Session:
    """One user's cookie jar against the portal at base_url."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect()
        )

    def clone(self) -> Session:
        """Another client with this one's cookies (the same logged-in session)."""
        other = Session(self.base_url)
        for cookie in self.jar:
            other.jar.set_cookie(cookie)
        return other

    def cookie(self, name: str) -> str:
        """The value of a cookie the portal set, or an empty string."""
        return next((c.value or "" for c in self.jar if c.name == name), "")

    def request(self, method: str, path: str, data: dict[str, str] | None = None) -> Answer:
        """Send one request and read the whole answer (3xx and 4xx included)."""
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base_url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with self.opener.open(req, timeout=60) as resp:
                return Answer(resp.status, resp.headers, resp.read().decode(errors="replace"))
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            return Answer(exc.code, exc.headers, text)

    def get(self, path: str) -> Answer:
        return self.request("GET", path)

    def post(self, path: str, data: dict[str, str]) -> Answer:
        """POST a form with the session's CSRF token, as the browser's form would."""
        return self.request("POST", path, {"csrfmiddlewaretoken": self.cookie("csrftoken"), **data})

    def log_in(self, username: str, password: str) -> Session:
        """Log in through the login form; RuntimeError if the portal refuses."""
        page = self.get("/accounts/login/")
        match = _CSRF_INPUT.search(page.body)
        if match is None:
            raise RuntimeError(f"no CSRF token on the login page (HTTP {page.status})")
        answer = self.request(
            "POST",
            "/accounts/login/",
            {"username": username, "password": password, "csrfmiddlewaretoken": match.group(1)},
        )
        if answer.status != 302 or not self.cookie("sessionid"):
            raise RuntimeError(f"log in as {username} failed (HTTP {answer.status})")
        return self
