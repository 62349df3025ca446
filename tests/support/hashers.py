"""A password hasher for the test process: PBKDF2 at one iteration.

Django's PBKDF2 takes a third of a second of CPU per hash (a million iterations), and the suite
makes a user, or several, in most of its tests: on 2 cores that was minutes of every CI run. A hash
made here is an ordinary `pbkdf2_sha256` hash that records its iteration count, so the portal's own
processes (the web server a browser test logs in to) check it as they check any other.
"""

from __future__ import annotations

from django.contrib.auth.hashers import PBKDF2PasswordHasher


class QuickPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    iterations = 1
