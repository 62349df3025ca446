"""Builds the tiny demo guest (cached under var/) and registers it as a template."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from provisioning.demo import debian as _debian
from provisioning.demo.tinyguest import BuildError
from provisioning.hypervisor.errors import HypervisorError
from provisioning.models import Host
from provisioning.services.demo import (
    demo_network,
    demo_seed,
    demo_seed_debian,
    demo_seed_methods,
    pxe_network,
)
from provisioning.services.hosts import host_ensure_local


class Command(BaseCommand):
    help = (
        "Build the tiny real guest and register it as the demo template; with --methods, one "
        "template for each other provisioning mode; with --debian, the Debian 12 cloud image "
        "and its network too."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--network",
            action="store_true",
            help="also define the demo's NAT network for guests (vmportal-demo) if missing",
        )
        parser.add_argument(
            "--methods",
            action="store_true",
            help="also register a template for every other provisioning mode (CD-ROM, PXE on an "
            "isolated network of its own, transient only, persistent only, import a disk)",
        )
        parser.add_argument(
            "--debian",
            action="store_true",
            help="also build (2-3 minutes, cached) and register the Debian 12 cloud-init template",
        )

    def handle(
        self,
        *args: Any,
        debian: bool = False,
        network: bool = False,
        methods: bool = False,
        **options: Any,
    ) -> None:
        host = host_ensure_local()
        try:
            demo_seed(host=host, log=self.stdout.write)
            if network or debian:
                self._network(host)
            if methods:
                self._methods(host)
            if debian:
                demo_seed_debian(host=host, log=self.stdout.write)
        except BuildError as exc:
            raise CommandError(f"demo: building the tiny guest failed: {exc}") from exc
        except _debian.BuildError as exc:
            raise CommandError(f"demo: building the Debian image failed: {exc}") from exc
        except HypervisorError as exc:
            raise CommandError(f"demo: libvirt at {host.uri} refused: {exc}") from exc

    def _methods(self, host: Host) -> None:
        try:
            pxe = pxe_network(host=host)
        except HypervisorError as exc:
            self.stderr.write(f"demo: no PXE network on {host}, so no PXE template: {exc}")
            pxe = None
        demo_seed_methods(host=host, log=self.stdout.write, pxe=pxe)

    def _network(self, host: Host) -> None:
        try:
            made = demo_network(host=host)
        except HypervisorError as exc:
            # The tiny guest needs no network; the cloud-init template does (and says so).
            self.stderr.write(f"demo: no NAT network for guests on {host}: {exc}")
        else:
            self.stdout.write(f"demo: network '{made.name}' (NAT, DHCP) on {host}")
