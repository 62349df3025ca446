"""`make bench`: run every benchmark against the real stack, print the table, write results.json.

Usage: python -m bench.run [--quick] [--only install,throughput,...] [--output bench/results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import stack as bench_stack
from bench.common import BENCH_DIR, ROOT, load_average


@dataclass(frozen=True)
class Figure:
    """One figure of the table: its key, its goal, and what it is compared with."""

    key: str
    label: str
    unit: str  # "ratio", or the unit of an absolute figure
    goal: float
    higher_is_better: bool = False
    portal: str = ""  # the details key of the portal's own value, for ratios
    anchor: str = ""  # the details key of the anchor's value, for ratios
    anchor_label: str = ""

    def met(self, value: float) -> bool:
        return value >= self.goal if self.higher_is_better else value <= self.goal

    @property
    def goal_text(self) -> str:
        sign = "≥" if self.higher_is_better else "≤"
        unit = "" if self.unit == "ratio" else f" {self.unit}"
        return f"{sign} {self.goal:g}{unit}"


INSTALL = "install, POST to phase 2 running"
FIGURES = [
    Figure(
        "install_vs_raw",
        INSTALL,
        "ratio",
        1.05,
        portal="install_portal_median_s",
        anchor="install_raw_median_s",
        anchor_label="raw libvirt-python",
    ),
    Figure(
        "install_vs_virt_install",
        INSTALL,
        "ratio",
        1.0,
        portal="install_portal_median_s",
        anchor="install_virt_install_median_s",
        anchor_label="virt-install --wait",
    ),
    Figure(
        "throughput_vs_raw",
        "provisions/s, HTTP to running in DB",
        "ratio",
        0.25,
        higher_is_better=True,
        portal="throughput_portal_per_s",
        anchor="throughput_raw_per_s",
        anchor_label="raw libvirt-python loop",
    ),
    Figure(
        "debian_ssh_vs_virt_install",
        "Debian cloud image, create to SSH answering",
        "ratio",
        1.0,
        portal="debian_portal_median_s",
        anchor="debian_virt_install_median_s",
        anchor_label="virt-install --import --cloud-init",
    ),
    Figure("debian_create_to_ssh_s", "Debian cloud image, form POST to SSH answering", "s", 120),
    Figure("queries_per_provision", "queries, form POST to running (one provision)", "queries", 40),
    Figure("waiting_action_p95_ms", "500 waiting: suspend queued→started p95", "ms", 1000),
    Figure("waiting_rss_kb_per_install", "500 waiting: RSS per install", "KB", 50),
    Figure("list_10k_p95_ms", "guest list, 10,000 guests, p95", "ms", 50),
    Figure("list_10k_queries", "guest list, 10,000 guests, queries", "queries", 10),
    Figure("api_guest_list_p95_ms", "API GET /guests?limit=50, 10,000 guests, p95", "ms", 50),
    Figure("api_guest_list_queries", "API GET /guests?limit=50, queries", "queries", 10),
    Figure(
        "api_create_vs_page",
        "install through the API, POST to running",
        "ratio",
        1.05,
        portal="api_create_to_running_s",
        anchor="api_create_page_median_s",
        anchor_label="the new-guest form",
    ),
    Figure("api_create_to_running_s", "install through the API, POST to running", "s", 60),
    Figure(
        "console_echo_vs_virsh",
        "keystroke in xterm.js to its echo in the terminal, p95",
        "ratio",
        1.5,
        portal="console_echo_parsed_p95_ms",
        anchor="console_echo_virsh_p95_ms",
        anchor_label="virsh console through a pty",
    ),
    Figure("console_echo_p95_ms", "keystroke in xterm.js to its echo drawn, p95", "ms", 50),
    Figure("event_to_dom_p95_ms", "libvirt event → badge in Chromium p95", "ms", 500),
    Figure("sse_1000_p95_ms", "1,000 SSE watchers, event latency p95", "ms", 1000),
    Figure(
        "stats_round_ms_1000",
        "usage sampling round, 1,000 guests (test driver), p95",
        "ms",
        200,
    ),
    Figure(
        "stats_bytes_per_guest_day",
        "usage graphs' storage per guest (all tiers full)",
        "KB",
        200,
    ),
]

# Run order: the QEMU installs first on a quiet stack; the 10,000 rows before the 500 waiting
# installs, which stay until the end.
BENCHMARKS = [
    "install",
    "api_install",
    "debian",
    "throughput",
    "event_to_dom",
    "console",
    "sse",
    "stats",
    "list",
    "api_list",
    "waiting",
]


def _benchmark(name: str) -> Callable[[Any], dict[str, Any]]:
    from bench import (
        api,
        browser,
        console,
        debian,
        install,
        listing,
        sse,
        stats,
        throughput,
        waiting,
    )

    runs: dict[str, Callable[[Any], dict[str, Any]]] = {
        "install": install.run,
        "api_install": api.install_run,
        "debian": debian.run,
        "console": console.run,
        "throughput": throughput.run,
        "event_to_dom": browser.run,
        "sse": sse.run,
        "stats": stats.run,
        "list": listing.run,
        "api_list": api.list_run,
        "waiting": waiting.run,
    }
    return runs[name]


def _command(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


def machine() -> dict[str, Any]:
    """CPU, cores, memory and kernel of this machine."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_mib": mem_kb // 1024,
        "kernel": platform.release(),
        "os": _command(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
    }


def versions(domain_type: str) -> dict[str, Any]:
    """Versions of everything the figures depend on."""
    import celery
    import django
    import libvirt
    from django.db import connection

    from provisioning.hypervisor.connection import get_hypervisor
    from provisioning.hypervisor.types import format_version

    conn = get_hypervisor(bench_stack.QEMU_URI).connection()
    with connection.cursor() as cursor:
        cursor.execute(
            "select sqlite_version()" if connection.vendor == "sqlite" else "show server_version"
        )
        db_version = cursor.fetchone()[0]
    return {
        "python": platform.python_version(),
        "django": django.get_version(),
        "celery": celery.__version__,
        "libvirt_python": metadata.version("libvirt-python"),
        "libvirt_library": format_version(libvirt.getVersion()),
        "libvirtd": format_version(conn.getLibVersion()),
        "qemu": format_version(conn.getVersion()),
        "domain_type": domain_type,
        "virt_install": _command(["virt-install", "--version"]),
        "chromium": _command(["chromium", "--version"]),
        "redis": _command(["redis-server", "--version"]),
        "database": f"{connection.vendor} {db_version}",
        "uvicorn": _command([str(Path(sys.executable).parent / "uvicorn"), "--version"]),
    }


def _fmt(value: float, unit: str) -> str:
    if unit == "ratio":
        return f"{value:.3f}"
    if unit in ("queries",):
        return f"{value:.0f}"
    return f"{value:.1f} {unit}"


def _value(details: dict[str, Any], key: str, unit: str) -> str:
    if not key or key not in details:
        return "—"
    value = float(details[key])
    if key.endswith("_per_s"):
        return f"{value:.1f}/s"
    return f"{value:.2f} s" if key.endswith("_s") else _fmt(value, unit)


def table(figures: dict[str, float], details: dict[str, Any]) -> str:
    """The figures, their anchors, the ratio or value, and the goal, as a Markdown table."""
    rows = [
        "| figure | what | portal | anchor | value | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in FIGURES:
        if f.key not in figures:
            rows.append(f"| `{f.key}` | {f.label} | — | — | not measured | {f.goal_text} | — |")
            continue
        value = figures[f.key]
        anchor = f"{f.anchor_label}: {_value(details, f.anchor, f.unit)}" if f.anchor else "—"
        rows.append(
            f"| `{f.key}` | {f.label} | {_value(details, f.portal, f.unit)} | {anchor} | "
            f"{_fmt(value, f.unit)} | {f.goal_text} | {'yes' if f.met(value) else 'NO'} |"
        )
    return "\n".join(rows)


def _known_domain_type() -> str:
    forced = os.environ.get("VMPORTAL_DOMAIN_TYPE", "auto")
    if forced in ("kvm", "qemu"):
        return forced
    cached = BENCH_DIR / "domain-type"
    return cached.read_text().strip() if cached.exists() else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one run each, fewer samples")
    parser.add_argument("--only", default="", help=f"comma list of {', '.join(BENCHMARKS)}")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results.json"))
    args = parser.parse_args(argv)
    chosen = [b for b in BENCHMARKS if not args.only or b in args.only.split(",")]
    began = time.monotonic()
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load_before = load_average()

    def log(message: str) -> None:
        print(f"bench [{time.monotonic() - began:6.1f} s] {message}", flush=True)

    open_files = bench_stack.raise_open_files()
    from tests.support.stack import RedisServer

    redis_server = RedisServer()
    database = bench_stack.database_url()
    env = bench_stack.prepare_environment(database=database, redis_url=redis_server.url)
    import django

    django.setup()
    redis_server.start()
    running: bench_stack.Stack | None = None
    ctx = None
    figures: dict[str, float] = {}
    details: dict[str, Any] = {}
    failures: dict[str, str] = {}
    try:
        bench_stack.migrate(env)
        seed = bench_stack.seed(domain_type=_known_domain_type(), log=log)
        from provisioning.services.hosts import host_domain_type

        domain_type = host_domain_type(host=seed.local)
        (BENCH_DIR / "domain-type").write_text(domain_type)
        log(
            f"database {database.split('@')[-1]}, redis {redis_server.url}, guests as {domain_type}"
        )
        running = bench_stack.Stack(env, [seed.local.name, seed.test.name]).start()
        log(f"stack up at {running.base_url}")
        from bench.context import Context

        ctx = Context(seed=seed, stack=running, quick=args.quick, domain_type=domain_type, log=log)
        for name in chosen:
            t0 = time.monotonic()
            log(f"{name}: starting")
            try:
                result = _benchmark(name)(ctx)
            except Exception as exc:  # noqa: BLE001 - report it, run the rest, fail at the end
                failures[name] = f"{exc.__class__.__name__}: {exc}"
                log(f"{name}: FAILED\n{traceback.format_exc()}")
                continue
            figures.update(result["figures"])
            details.update(result["details"])
            details[f"{name}_duration_s"] = time.monotonic() - t0
            log(f"{name}: done in {time.monotonic() - t0:.1f} s: {result['figures']}")
        meta_versions = versions(domain_type)
    finally:
        if running is not None:
            running.stop()
        if ctx is not None:
            ctx.made.remove_all(log)
        redis_server.stop()
        shutil.rmtree(redis_server.dir, ignore_errors=True)

    results: dict[str, Any] = dict(figures)
    results.update(
        {
            "goals": {f.key: f.goal_text for f in FIGURES},
            "met": {f.key: f.met(figures[f.key]) for f in FIGURES if f.key in figures},
            "quick": args.quick,
            "runs": {
                "install": details.get("install_runs"),
                "throughput": details.get("throughput_runs"),
                "throughput_guests_per_run": details.get("throughput_guests_per_run"),
                "waiting_suspends": len(details.get("waiting_suspend_delays_ms", [])),
                "list_requests": len(details.get("list_10k_http_ms", [])),
                "api_install": details.get("api_create_runs"),
                "api_list_requests": len(details.get("api_guest_list_staff_ms", []))
                + len(details.get("api_guest_list_owner_ms", [])),
                "event_to_dom_samples": details.get("event_to_dom_samples"),
                "sse_samples": details.get("sse_samples"),
            },
            "machine": machine() | {"open_files_limit": open_files},
            "versions": meta_versions,
            "load_average": {"before": load_before, "after": load_average()},
            "started": started_at,
            "duration_s": round(time.monotonic() - began, 1),
            "failures": failures,
            "details": details,
        }
    )
    output = Path(args.output)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(table(figures, details))
    print()
    m, v = results["machine"], results["versions"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_mib']} MiB, {m['os']}")
    print(
        f"versions: python {v['python']}, django {v['django']}, celery {v['celery']}, "
        f"libvirt {v['libvirtd']} (python {v['libvirt_python']}), qemu {v['qemu']} "
        f"({v['domain_type']}), {v['database']}"
    )
    print(f"runs: {json.dumps(results['runs'])}")
    around = details.get("install_around_installer_median_s")
    if around:
        print(
            f"install, all but the installer's own run (medians): portal {around['portal']:.2f} s, "
            f"raw {around['raw']:.2f} s"
        )
    print(
        f"{'quick' if args.quick else 'full'} run in {results['duration_s']} s; "
        f"load average before {load_before[0]:.2f}, after {load_average()[0]:.2f}; "
        f"results in {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}"
    )
    missing = [f.key for f in FIGURES if f.key not in figures]
    if failures:
        print(f"FAILED: {failures}", file=sys.stderr)
    # A partial run (--only) leaves figures out on purpose; a full one must have them all.
    return 1 if failures or (missing and not args.only) else 0


if __name__ == "__main__":
    raise SystemExit(main())
