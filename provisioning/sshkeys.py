"""Users' SSH public keys: one pasted key checked by a real parser, refused with a reason.

No Django: the service that stores keys and the forms call `parse`, and tests call it directly.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
import unicodedata
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_public_key,
)

MAX_BYTES = 16 * 1024
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 16384  # OpenSSH's own limit
ACCEPTED = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
CERT_SUFFIX = "-cert-v01@openssh.com"
# Types we know but refuse, so a key behind options or a second key on the line is recognised.
KNOWN = (*ACCEPTED, "ssh-dss", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
HOW_TO_MAKE = "Make one with `ssh-keygen -t ed25519` and paste the .pub file."
# "openssh-key-v1\0" in base64: the body of an OpenSSH private key, even without its armour.
OPENSSH_PRIVATE_BODY = "b3BlbnNzaC1rZXktdjE"
_ARMOUR = re.compile(r"-{4,5} ?BEGIN ([A-Z0-9 ]+?) ?-{4,5}")


class KeyRefused(ValueError):
    """A pasted text that is not one acceptable SSH public key; the message says why."""


class PrivateKeyPasted(KeyRefused):
    """A private key was pasted: refused, and never to be shown back or kept."""


@dataclass(frozen=True)
class PublicKey:
    """One checked public key: its type, authorized_keys line, size and SHA256 fingerprint."""

    type: str
    line: str
    bits: int
    fingerprint: str
    comment: str


def parse(text: str) -> PublicKey:
    """The one public key in `text` (an authorized_keys / .pub line); KeyRefused otherwise."""
    if len(text.encode("utf-8", "replace")) > MAX_BYTES:
        raise KeyRefused(f"That is too long for a public key (over {MAX_BYTES // 1024} KiB).")
    text = text.replace("\ufeff", "").strip()
    if not text:
        raise KeyRefused(f"Paste a public key. {HOW_TO_MAKE}")
    _refuse_armoured(text)
    # Blank lines and authorized_keys comment lines around the key are harmless.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("#")]
    if not lines:
        raise KeyRefused(f"Paste a public key. {HOW_TO_MAKE}")
    if len(lines) > 1:
        if sum(1 for line in lines if _type_at(line.split()) is not None) > 1:
            raise KeyRefused("Paste one key at a time: this holds several.")
        raise KeyRefused("A public key is one line; this one is broken across several lines.")
    return _parse_line(lines[0])


def fingerprint_of(blob: bytes) -> str:
    """The key's fingerprint as `ssh-keygen -l` prints it."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def _refuse_armoured(text: str) -> None:
    armour = _ARMOUR.search(text)
    if (
        (armour and "PRIVATE" in armour.group(1))
        or OPENSSH_PRIVATE_BODY in text
        or text.startswith("PuTTY-User-Key-File")
    ):
        raise PrivateKeyPasted(
            "This is a PRIVATE key: it was not stored. Paste the public key (the .pub file) "
            "instead, and keep the private key to yourself."
        )
    if armour:
        raise KeyRefused(
            f"Paste the key in OpenSSH's one-line form, not as {armour.group(1).title()} "
            "(`ssh-keygen -i -f FILE` converts it)."
        )


def _type_at(tokens: list[str]) -> int | None:
    """Where the first token that names a key type (or certificate) is."""
    for i, token in enumerate(tokens):
        if token in KNOWN or token.endswith(CERT_SUFFIX):
            return i
    return None


def _parse_line(line: str) -> PublicKey:
    tokens = line.split()
    where = _type_at(tokens)
    if where is None:
        if tokens[0].startswith("AAAA"):
            raise KeyRefused("The key's type is missing in front of it (ssh-ed25519, ssh-rsa …).")
        raise KeyRefused(f"This is not an SSH public key. {HOW_TO_MAKE}")
    if where > 0:
        raise KeyRefused(
            "Remove the options in front of the key (such as command=, from= or no-pty): "
            "paste the key alone, starting with its type."
        )
    key_type = tokens[0]
    _refuse_type(key_type)
    parts = line.split(maxsplit=2)
    if len(parts) < 2:
        raise KeyRefused("The key itself is missing after its type: was it cut short?")
    body = parts[1]
    comment = _clean(parts[2]) if len(parts) > 2 else ""
    if _type_at(comment.split()) is not None:
        raise KeyRefused("Paste one key at a time: this holds several.")
    blob = _decode(body)
    _check_inner_type(blob, key_type)
    try:
        key = load_ssh_public_key(f"{key_type} {body}".encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyRefused("The key is damaged: it is cut short or changed.") from exc
    bits = _bits(key)
    canonical = key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    if canonical.split()[1] != base64.b64encode(blob):
        raise KeyRefused("The key is damaged: it holds more than the key, or holds it oddly.")
    normal = f"{key_type} {base64.b64encode(blob).decode()}"
    return PublicKey(
        type=key_type,
        line=f"{normal} {comment}" if comment else normal,
        bits=bits,
        fingerprint=fingerprint_of(blob),
        comment=comment,
    )


def _refuse_type(key_type: str) -> None:
    if key_type.endswith(CERT_SUFFIX):
        raise KeyRefused("This is an SSH certificate: paste the plain public key instead.")
    if key_type == "ssh-dss":
        raise KeyRefused(f"DSA keys are refused: OpenSSH no longer accepts them. {HOW_TO_MAKE}")
    if key_type.startswith("sk-"):
        raise KeyRefused(
            "Security-key (FIDO, sk-…) keys are not supported yet: use an ed25519, "
            "ECDSA or RSA key."
        )


def _decode(body: str) -> bytes:
    try:
        blob = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyRefused("The key is damaged: its base64 is cut short or changed.") from exc
    if not blob:
        raise KeyRefused("The key itself is missing after its type: was it cut short?")
    return blob


def _check_inner_type(blob: bytes, key_type: str) -> None:
    """The type the blob starts with is the one the line names (a swapped prefix is refused)."""
    if len(blob) < 4:
        raise KeyRefused("The key is damaged: it is cut short.")
    (length,) = struct.unpack(">I", blob[:4])
    inner = blob[4 : 4 + length]
    if length > 64 or len(inner) != length:
        raise KeyRefused("The key is damaged: it is cut short or changed.")
    if inner != key_type.encode():
        named = inner.decode("ascii", "replace")
        raise KeyRefused(f"The key says {key_type} in front, but the key inside is {named}.")


def _bits(key: object) -> int:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return 256
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.curve.key_size
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < RSA_MIN_BITS:
            raise KeyRefused(
                f"This RSA key has {key.key_size} bits; at least {RSA_MIN_BITS} are needed. "
                f"{HOW_TO_MAKE}"
            )
        if key.key_size > RSA_MAX_BITS:
            raise KeyRefused(f"RSA keys of more than {RSA_MAX_BITS} bits are refused.")
        return key.key_size
    raise KeyRefused(f"This kind of key is not supported. {HOW_TO_MAKE}")


def _clean(comment: str) -> str:
    """The comment without control or invisible formatting characters, spaces collapsed."""
    kept = "".join(
        " " if ch.isspace() else ch
        for ch in comment
        if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf")
    )
    return " ".join(kept.split())
