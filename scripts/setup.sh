#!/usr/bin/env bash
# Installs what vmportal needs on Debian 12 (as root), idempotently and quickly when all is there:
# OS packages, the Python virtualenv with the project, and the front-end packages from npm.
# Usage: scripts/setup.sh [--test]   (--test adds what the test suite needs: Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

packages=(
  # libvirt and QEMU
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
  qemu-system-x86 qemu-utils ipxe-qemu dnsmasq-base iptables
  # the tiny demo guest: kernel from Debian, busybox initramfs, bootable disk, ISO and PXE root
  busybox-static cpio xz-utils syslinux syslinux-common isolinux pxelinux mtools dosfstools xorriso
  # Redis and building Python packages
  redis-server gcc python3-dev python3-venv
)
command -v node >/dev/null && command -v npm >/dev/null || packages+=(nodejs npm)
(( want_test )) && packages+=(chromium fonts-dejavu-core)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
  if [[ $EUID -ne 0 ]]; then
    echo "setup: missing Debian packages (${missing[*]}); run as root or install them" >&2
    exit 1
  fi
  echo "setup: installing Debian packages: ${missing[*]}"
  # libvirt-daemon-system would want systemd; the daemons are started by scripts/ensure-libvirtd.sh.
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Python: a virtualenv with the project (and its dev extra), reinstalled when pyproject changes.
py=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  "$py" -m venv .venv
fi
stamp=.venv/.vmportal-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi

# Front-end packages from npm, copied into the git-ignored static/vendor.
if [[ ! -d node_modules || package.json -nt node_modules || package-lock.json -nt node_modules ]]; then
  echo "setup: installing front-end packages from npm"
  if [[ -f package-lock.json ]]; then npm ci --no-audit --no-fund -s; else npm install --no-audit --no-fund -s; fi
  touch node_modules
fi
mkdir -p static/vendor
cp node_modules/htmx.org/dist/htmx.min.js static/vendor/htmx.min.js
cp node_modules/htmx-ext-sse/sse.js static/vendor/htmx-ext-sse.js
# The browser consoles: xterm.js (UMD builds) and noVNC's ES modules with the parts they import.
mkdir -p static/vendor/xterm static/vendor/novnc
cp node_modules/@xterm/xterm/lib/xterm.js node_modules/@xterm/xterm/css/xterm.css static/vendor/xterm/
cp node_modules/@xterm/addon-fit/lib/addon-fit.js static/vendor/xterm/
rm -rf static/vendor/novnc/core static/vendor/novnc/vendor
cp -r node_modules/@novnc/novnc/core node_modules/@novnc/novnc/vendor static/vendor/novnc/
# The guests' usage graphs.
mkdir -p static/vendor/uplot
cp node_modules/uplot/dist/uPlot.iife.min.js node_modules/uplot/dist/uPlot.min.css static/vendor/uplot/
# The API's interactive docs (/api/v1/docs).
mkdir -p static/vendor/swagger-ui
cp node_modules/swagger-ui-dist/swagger-ui-bundle.js node_modules/swagger-ui-dist/swagger-ui.css static/vendor/swagger-ui/

# cloud-init's JSON schema for cloud-config, from Debian's cloud-init package (downloaded, never
# installed: this machine is no cloud guest), so templates and owners' snippets are checked
# against the cloud-init the demo image runs.
schema=var/cloud-init/schema-cloud-config-v1.json
if [[ ! -s $schema ]]; then
  echo "setup: fetching cloud-init's cloud-config schema"
  work=$(mktemp -d)
  (cd "$work" && apt-get download -q cloud-init >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get download -q cloud-init >/dev/null; })
  dpkg-deb -x "$work"/cloud-init_*.deb "$work/x"
  mkdir -p "$(dirname "$schema")"
  cp "$(find "$work/x" -name schema-cloud-config-v1.json | head -1)" "$schema"
  rm -rf "$work"
fi
