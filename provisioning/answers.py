"""Answer files (kickstart, preseed, autoinstall user-data, any text) rendered per request.

An admin writes the answer file in the Django template language, over a fixed context of plain
values (see ``context_for``), with a short list of tags and no loaders: nothing in it reaches
settings, files or other objects. ``check`` says what is wrong with a template; ``render``
gives the file for one guest. The install's kernel command line names it with ``{answer_url}``.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Iterable
from typing import Any

from django.template import Context, Engine, TemplateSyntaxError
from django.template.base import Lexer, TokenType

from provisioning import cloudinit

with warnings.catch_warnings():
    # crypt is what builds the SHA-512 hashes installers take (rootpw --iscrypted, passwd/
    # root-password-crypted); Python 3.11 only warns that it will go in 3.13.
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt

PLACEHOLDER = "{answer_url}"
# The label installers look for when no answer-file URL is given (Anaconda's OEMDRV), and the
# file's name on it (what Anaconda reads there).
OEMDRV_LABEL = "OEMDRV"
OEMDRV_FILE = "ks.cfg"
MAX_BYTES = 1024 * 1024
# The kernel's command line limit on x86 (COMMAND_LINE_SIZE), the terminating NUL included.
CMDLINE_MAX = 2048
ALLOWED_TAGS = frozenset(
    {
        "if", "elif", "else", "endif",
        "for", "empty", "endfor",
        "with", "endwith",
        "comment", "endcomment",
        "spaceless", "endspaceless",
        "verbatim", "endverbatim",
        "filter", "endfilter",
        "firstof", "cycle", "now", "templatetag", "widthratio",
    }
)  # fmt: skip
# What every answer file may use, documented in the admin's help text.
CONTEXT_KEYS = (
    "name",
    "uuid",
    "mac",
    "ssh_keys",
    "vcpus",
    "memory_mib",
    "disk_mib",
    "password_hash",
)
# No loaders, no libraries beyond Django's own tags and filters, nothing escaped (it is not HTML).
_ENGINE = Engine(dirs=[], app_dirs=False, libraries={}, autoescape=False, string_if_invalid="")


class AnswerFileError(ValueError):
    """What is wrong with an answer-file template or its rendering, said for a field error."""


def check(source: str) -> None:
    """AnswerFileError unless `source` parses and uses only the allowed tags."""
    for token in Lexer(source).tokenize():
        if token.token_type is not TokenType.BLOCK:
            continue
        parts = token.split_contents()
        tag = parts[0] if parts else ""
        if tag not in ALLOWED_TAGS:
            allowed = ", ".join(sorted(t for t in ALLOWED_TAGS if not t.startswith("end")))
            raise AnswerFileError(
                f"line {token.lineno}: the tag {{% {tag} %}} is not allowed in answer files "
                f"(allowed: {allowed})"
            )
    try:
        _ENGINE.from_string(source)
    except TemplateSyntaxError as exc:
        raise AnswerFileError(f"the answer file does not parse: {exc}") from exc


def password_hash(password: str) -> str:
    """The SHA-512 crypt(3) hash of a password, as kickstart's and preseed's crypted forms take."""
    return crypt.crypt(password, crypt.mksalt(crypt.METHOD_SHA512))


def one_time_password() -> str:
    return secrets.token_urlsafe(12)


def context_for(
    *,
    name: str,
    uuid: str,
    mac: str,
    ssh_keys: Iterable[str],
    vcpus: int,
    memory_mib: int,
    disk_mib: int,
    password_hash: str,
) -> dict[str, Any]:
    """The whole context an answer file sees: plain strings, numbers and a list of strings."""
    return {
        "name": str(name),
        "uuid": str(uuid),
        "mac": str(mac),
        "ssh_keys": [str(k) for k in ssh_keys],
        "vcpus": int(vcpus),
        "memory_mib": int(memory_mib),
        "disk_mib": int(disk_mib),
        "password_hash": str(password_hash),
    }


def sample_context() -> dict[str, Any]:
    """What the admin's preview renders with."""
    return context_for(
        name="example-guest",
        uuid="00000000-0000-4000-8000-000000000000",
        mac="52:54:00:12:34:56",
        ssh_keys=[
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnlyForThePreview0000000 you@laptop"
        ],
        vcpus=1,
        memory_mib=512,
        disk_mib=1024,
        password_hash="$6$examplesalt$" + "x" * 86,
    )


def render(source: str, context: dict[str, Any]) -> str:
    """The answer file for one guest; AnswerFileError if it does not render or is too big."""
    check(source)
    text = _ENGINE.from_string(source).render(Context(context, autoescape=False))
    if len(text.encode()) > MAX_BYTES:
        raise AnswerFileError(
            f"the rendered answer file is {len(text.encode())} bytes; at most {MAX_BYTES} "
            "(1 MiB) is served"
        )
    return text


def oemdrv_iso(content: str) -> bytes:
    """A small ISO 9660 image labelled OEMDRV holding the answer file as ks.cfg."""
    return cloudinit.iso_image(OEMDRV_LABEL, {"KS.CFG": (OEMDRV_FILE, content.encode())})


def cmdline_problem(
    cmdline: str, *, answer_file: bool, url_length: int, by_url: bool = True
) -> str | None:
    """Why a kernel command line does not fit the template's answer file, or None.

    by_url: the file is fetched from the portal (its URL goes in the command line), not put on
    an OEMDRV CD-ROM (nothing to name there)."""
    has = PLACEHOLDER in cmdline
    if has and not answer_file:
        return f"the command line names {PLACEHOLDER} but the template has no answer file"
    if has and not by_url:
        return f"the answer file goes on an OEMDRV CD-ROM: take {PLACEHOLDER} out"
    if answer_file and by_url and not has:
        return f"the template has an answer file: put {PLACEHOLDER} in the command line"
    length = len(cmdline.replace(PLACEHOLDER, "x" * url_length).encode()) if has else len(cmdline)
    if length >= CMDLINE_MAX:
        return (
            f"the command line would be {length} bytes; the kernel takes at most {CMDLINE_MAX - 1}"
        )
    return None
