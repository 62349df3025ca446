"""The Debian 12 cloud image: apt sources, cache, and what is baked in.

Its real boot to SSH (with cloud-init, the guest agent and a shutdown through it) is the portal's
own, end to end in tests/web/browser/test_debian_qemu.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from provisioning.demo import debian
from tests.support.qemu import DEMO_CACHE

CACHE_DIR = DEMO_CACHE / "debian"


# --- apt sources (unit) -----------------------------------------------------------------------


def _apt_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (apt / name).write_text(text)
    return apt


def test_it_reads_deb822_sources_of_the_suite_and_its_updates_and_security() -> None:
    text = (
        "Types: deb deb-src\nURIs: http://mirror.invalid/debian\n"
        "Suites: bookworm bookworm-updates bookworm-backports\nComponents: main contrib\n"
        "Signed-By: /usr/share/keyrings/k.gpg\n\n"
        "# a comment\nTypes: deb\nURIs: http://mirror.invalid/security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.invalid/other\nSuites: nodistro\nComponents: main\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://mirror.invalid/off\nSuites: bookworm\n"
        "Components: main\n"
    )
    signed = "deb [signed-by=/usr/share/keyrings/k.gpg] http://mirror.invalid/debian"
    assert debian._deb822_entries(text, "bookworm") == [
        f"{signed} bookworm main contrib",
        f"{signed} bookworm-updates main contrib",
        "deb http://mirror.invalid/security bookworm-security main",
    ]


def test_it_reads_one_line_sources_with_options_and_skips_the_rest(tmp_path: Path) -> None:
    apt = _apt_dir(
        tmp_path,
        {
            "sources.list": (
                "deb [ arch=amd64 signed-by=/k.gpg ] http://mirror.invalid/debian bookworm main\n"
                "deb-src http://mirror.invalid/debian bookworm main\n"
                "# deb http://mirror.invalid/debian bookworm-updates main\n"
                "deb cdrom:[Debian 12]/ bookworm main\n"
                "deb http://mirror.invalid/debian bullseye main\n"
            ),
            "sources.list.d/extra.list": "deb http://mirror.invalid/debian bookworm-updates main\n",
            "sources.list.d/off.list.disabled": "deb http://mirror.invalid/x bookworm main\n",
        },
    )
    assert debian.apt_sources("bookworm", apt) == [
        "deb [ arch=amd64 signed-by=/k.gpg ] http://mirror.invalid/debian bookworm main",
        "deb http://mirror.invalid/debian bookworm-updates main",
    ]


def test_it_drops_an_inline_key_it_cannot_put_on_one_line() -> None:
    text = (
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm\nComponents: main\n"
        "Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n"
        " -----END PGP PUBLIC KEY BLOCK-----\n"
    )
    assert debian._deb822_entries(text, "bookworm") == [
        "deb http://mirror.invalid/debian bookworm main"
    ]


def test_it_finds_sources_on_this_machine() -> None:
    # The build reads them at run time; this machine has apt sources for Debian 12.
    sources = debian.apt_sources()
    assert sources
    assert all(s.startswith("deb ") for s in sources)


# --- cache (unit) -----------------------------------------------------------------------------


def test_it_reports_an_empty_cache_dir_as_not_cached(tmp_path: Path) -> None:
    assert debian.cached(tmp_path) is None


def _fake_cache(root: Path, recipe: str) -> None:
    for name in ("base.qcow2", "vmlinuz", "initrd.img"):
        (root / name).write_bytes(b"x")
    manifest = {"recipe": recipe, "kernel_version": "6.1.0-1-amd64", "default_user": "debian"}
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_it_reads_a_complete_cache_and_refuses_another_recipe_or_a_missing_file(
    tmp_path: Path,
) -> None:
    _fake_cache(tmp_path, debian._recipe_hash())
    image = debian.cached(tmp_path)
    assert image is not None
    assert image.base == tmp_path / "base.qcow2"
    assert (image.default_user, image.kernel_version) == ("debian", "6.1.0-1-amd64")
    assert image.cmdline == "root=LABEL=root ro console=ttyS0"
    (tmp_path / "initrd.img").unlink()
    assert debian.cached(tmp_path) is None
    _fake_cache(tmp_path, "older")
    assert debian.cached(tmp_path) is None


def test_it_pins_cloud_init_to_nocloud() -> None:
    _, cfg = debian.IMAGE_FILES["etc/cloud/cloud.cfg.d/90-vmportal.cfg"]
    assert "datasource_list: [ NoCloud, None ]" in cfg.splitlines()


# --- the real image ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def image() -> debian.DebianImage:
    if os.geteuid() != 0:
        pytest.skip("building the Debian image needs root")
    return debian.build(CACHE_DIR)


def _debugfs(raw: Path, request: str) -> str:
    proc = subprocess.run(
        ["debugfs", "-R", request, str(raw)], capture_output=True, text=True, check=True
    )
    return proc.stdout


def _names(raw: Path, folder: str) -> set[str]:
    """A folder's entries in the filesystem image (debugfs `ls -p`: /ino/mode/uid/gid/name/)."""
    lines = _debugfs(raw, f"ls -p {folder}").splitlines()
    return {line.split("/")[5] for line in lines if line.count("/") >= 6} - {".", ".."}


@pytest.mark.qemu
@pytest.mark.debian
@pytest.mark.timeout(1200)
def test_it_bakes_no_host_keys_or_apt_lists_into_the_image(
    image: debian.DebianImage, tmp_path: Path
) -> None:
    raw = tmp_path / "root.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(image.base), str(raw)], check=True, timeout=120
    )
    ssh = _names(raw, "/etc/ssh")
    assert "sshd_config" in ssh
    assert not [name for name in ssh if name.startswith("ssh_host_")]
    assert _names(raw, "/var/lib/apt/lists") == set()
    assert "serial-getty@ttyS0.service" in _names(raw, "/etc/systemd/system/getty.target.wants")
    cfg = _debugfs(raw, "cat /etc/cloud/cloud.cfg.d/90-vmportal.cfg")
    assert "datasource_list: [ NoCloud, None ]" in cfg
    assert "LABEL=root" in _debugfs(raw, "cat /etc/fstab")
    label = subprocess.run(
        ["blkid", "-o", "value", "-s", "LABEL", str(raw)], capture_output=True, text=True
    )
    assert label.stdout.strip() == "root"
