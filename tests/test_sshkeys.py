"""Pasted SSH public keys: the ones OpenSSH accepts are kept normalised, the rest refused."""

from __future__ import annotations

import base64
import hashlib
import shutil
import struct
import subprocess
import warnings
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import dsa, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    SSHCertificateBuilder,
    SSHCertificateType,
)

from provisioning.sshkeys import KeyRefused, parse
from tests.factories import new_public_key


def _fingerprint(line: str) -> str:
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _sshstr(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _refused(text: str) -> str:
    with pytest.raises(KeyRefused) as caught:
        parse(text)
    return str(caught.value)


# --- accepted ---


@pytest.mark.parametrize(
    ("kind", "bits", "type_"),
    [
        ("ed25519", 256, "ssh-ed25519"),
        ("ecdsa", 256, "ecdsa-sha2-nistp256"),
        ("ecdsa", 384, "ecdsa-sha2-nistp384"),
        ("ecdsa", 521, "ecdsa-sha2-nistp521"),
        ("rsa", 2048, "ssh-rsa"),
        ("rsa", 3072, "ssh-rsa"),
    ],
)
def test_it_accepts_the_key_types_openssh_does(kind: str, bits: int, type_: str) -> None:
    line = new_public_key(kind, bits=bits, comment="alice@laptop")
    key = parse(line)
    assert key.type == type_
    assert key.bits == bits
    assert key.line == line
    assert key.comment == "alice@laptop"
    assert key.fingerprint == _fingerprint(line)


def test_it_accepts_a_key_without_a_comment() -> None:
    line = new_public_key()
    key = parse(line)
    assert key.line == line and key.comment == ""


def test_it_normalises_spaces_and_line_endings() -> None:
    line = new_public_key()
    kind, body = line.split()
    key = parse(f"\ufeff  {kind}\t{body}   my   laptop \r\n\r\n")
    assert key.line == f"{kind} {body} my laptop"


def test_it_strips_control_characters_from_the_comment() -> None:
    line = new_public_key()
    key = parse(f"{line} evil\x1b[2J\x07@host\u202e\x00")
    assert key.comment == "evil[2J@host"
    assert key.line == f"{line} evil[2J@host"


def test_a_comment_may_say_private_key() -> None:
    assert parse(new_public_key(comment="not my private key")).comment == "not my private key"


def test_authorized_keys_comment_lines_around_the_key_are_ignored() -> None:
    line = new_public_key()
    assert parse(f"# laptop\n{line}\n").line == line


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="openssh-client is not installed")
@pytest.mark.parametrize("args", [["-t", "ed25519"], ["-t", "rsa", "-b", "3072"]])
def test_the_fingerprint_is_the_one_ssh_keygen_prints(tmp_path: Path, args: list[str]) -> None:
    path = tmp_path / "id"
    subprocess.run(
        ["ssh-keygen", "-q", *args, "-N", "", "-C", "bob@desk", "-f", str(path)], check=True
    )
    printed = subprocess.run(
        ["ssh-keygen", "-lf", f"{path}.pub"], check=True, capture_output=True, text=True
    ).stdout.split()
    key = parse(Path(f"{path}.pub").read_text())
    assert key.fingerprint == printed[1]
    assert key.bits == int(printed[0])
    assert key.line == Path(f"{path}.pub").read_text().strip()


# --- refused ---


@pytest.mark.parametrize(
    "private",
    [
        lambda k: k.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()),
        lambda k: k.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
        lambda k: k.private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"secret")
        ),
    ],
    ids=["openssh", "pkcs8", "pkcs8-encrypted"],
)
def test_it_refuses_a_private_key(private) -> None:
    text = private(ed25519.Ed25519PrivateKey.generate()).decode()
    assert "PRIVATE key" in _refused(text)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="openssh-client is not installed")
def test_it_refuses_a_passphrase_protected_private_key_from_ssh_keygen(tmp_path: Path) -> None:
    path = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", path], check=True)
    assert "PRIVATE key" in _refused(path.read_text())


def test_it_refuses_an_rsa_private_key_in_the_old_pem_form() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    text = key.private_bytes(Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption())
    assert "PRIVATE key" in _refused(text.decode())


def test_it_refuses_the_body_of_an_openssh_private_key_without_its_armour() -> None:
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()
    )
    body = "".join(pem.decode().splitlines()[1:-1])
    assert "PRIVATE key" in _refused(body)


def test_it_refuses_a_public_key_in_another_armour() -> None:
    pem = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    assert "one-line form" in _refused(pem.decode())
    assert "one-line form" in _refused("---- BEGIN SSH2 PUBLIC KEY ----\nAAAA\n---- END SSH2")


@pytest.mark.parametrize("cut", [5, 8, 40])
def test_it_refuses_a_truncated_key(cut: int) -> None:
    kind, body = new_public_key("rsa").split()
    assert "damaged" in _refused(f"{kind} {body[:-cut]}")


def test_it_refuses_a_key_whose_base64_is_garbled() -> None:
    kind, body = new_public_key().split()
    assert "damaged" in _refused(f"{kind} {body[:20]}*{body[21:]}")


def test_it_refuses_a_key_with_bytes_after_it() -> None:
    kind, body = new_public_key().split()
    padded = base64.b64encode(base64.b64decode(body) + b"\x00\x00\x00\x00").decode()
    assert "damaged" in _refused(f"{kind} {padded}")


def test_it_refuses_a_key_whose_type_does_not_match_its_prefix() -> None:
    body = new_public_key().split()[1]
    assert "says ssh-rsa in front, but the key inside is ssh-ed25519" in _refused(f"ssh-rsa {body}")
    p256 = new_public_key("ecdsa", bits=256).split()[1]
    assert "inside is ecdsa-sha2-nistp256" in _refused(f"ecdsa-sha2-nistp384 {p256}")


def test_it_refuses_a_type_alone() -> None:
    assert "missing" in _refused("ssh-ed25519")


def test_it_refuses_a_key_without_its_type() -> None:
    assert "type is missing" in _refused(new_public_key().split()[1])


def test_it_refuses_what_is_no_key_at_all() -> None:
    assert "not an SSH public key" in _refused("hello world")


@pytest.mark.parametrize(
    "options",
    [
        'command="echo hi"',
        'from="10.0.0.0/8"',
        "no-pty",
        'restrict,command="/bin/true",no-agent-forwarding',
    ],
)
def test_it_refuses_a_key_with_options_in_front(options: str) -> None:
    assert "options in front" in _refused(f"{options} {new_public_key(comment='me@host')}")


def test_it_refuses_several_keys_on_several_lines() -> None:
    text = f"{new_public_key(comment='a')}\n{new_public_key('ecdsa', bits=256, comment='b')}\n"
    assert "one key at a time" in _refused(text)


def test_it_refuses_several_keys_on_one_line() -> None:
    assert "one key at a time" in _refused(f"{new_public_key()} {new_public_key()}")


def test_it_refuses_a_key_broken_across_lines() -> None:
    kind, body = new_public_key("rsa").split()
    assert "broken across" in _refused(f"{kind} {body[:100]}\n{body[100:]}")


@pytest.mark.parametrize("bits", [1024, 2047])
def test_it_refuses_rsa_keys_under_2048_bits(bits: int) -> None:
    if bits == 2047:
        # cryptography makes no odd sizes; a 2048-bit modulus shifted down is one of 2047 bits.
        n = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
        modulus = (n.public_numbers().n >> 1) | 1
        raw = modulus.to_bytes((modulus.bit_length() + 8) // 8, "big")
        blob = _sshstr(b"ssh-rsa") + _sshstr(b"\x01\x00\x01") + _sshstr(raw)
        line = f"ssh-rsa {base64.b64encode(blob).decode()}"
    else:
        line = new_public_key("rsa", bits=bits)
    assert f"has {bits} bits; at least 2048" in _refused(line)


def test_it_refuses_dsa_keys() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cryptography deprecates DSA in SSH, as OpenSSH did
        key = dsa.generate_private_key(key_size=1024).public_key()
        line = key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    assert "DSA keys are refused" in _refused(line)


def test_it_refuses_certificates() -> None:
    ca = ed25519.Ed25519PrivateKey.generate()
    cert = (
        SSHCertificateBuilder()
        .public_key(ed25519.Ed25519PrivateKey.generate().public_key())
        .serial(1)
        .type(SSHCertificateType.USER)
        .key_id(b"alice")
        .valid_principals([b"alice"])
        .valid_after(0)
        .valid_before(2**40)
        .sign(ca)
    )
    line = cert.public_bytes().decode()
    assert line.startswith("ssh-ed25519-cert-v01@openssh.com ")
    assert "certificate" in _refused(line)


def test_it_refuses_security_key_keys() -> None:
    blob = _sshstr(b"sk-ssh-ed25519@openssh.com") + _sshstr(b"\x01" * 32) + _sshstr(b"ssh:")
    assert "Security-key" in _refused(
        f"sk-ssh-ed25519@openssh.com {base64.b64encode(blob).decode()}"
    )


@pytest.mark.parametrize("text", ["", "   \n\t ", "# only a comment\n"])
def test_it_refuses_empty_input(text: str) -> None:
    assert "Paste a public key" in _refused(text)


def test_it_refuses_over_long_input() -> None:
    assert "too long" in _refused(f"{new_public_key()} {'x' * 16 * 1024}")
