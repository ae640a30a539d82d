"""The proplet process's own memory, as its MQTT metrics and its Prometheus endpoint report it."""

from __future__ import annotations

import contextlib
import os

# cgroup v2 files: what the proplet's cgroup uses, and its limit ("max" when there is none).
CGROUP_MEMORY_FILES = {"container_usage_bytes": "/sys/fs/cgroup/memory.current",
                       "container_limit_bytes": "/sys/fs/cgroup/memory.max"}


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def cgroup_memory() -> dict[str, int]:
    """`container_usage_bytes` and `container_limit_bytes` where cgroup v2 gives them (no limit: absent)."""
    out = {}
    for key, path in CGROUP_MEMORY_FILES.items():
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            out[key] = int(f.read().strip())
    return out
