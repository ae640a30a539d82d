"""The sources and the proxy run on small edge boxes: importing them must not drag in the console,
the database drivers or the manager service, and the proplet's sources must not load oras."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("textual", "console", "aiosqlite", "asyncpg", "core.service", "core.store", "core.api")


def loaded_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def test_the_sources_and_the_proxy_import_nothing_forbidden() -> None:
    modules = loaded_after("import proplet.sources, proplet.proxy, proplet.proxy_cli")
    assert "proplet.proxy" in modules
    assert not {m for m in modules if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN}


def test_the_sources_do_not_load_oras_or_requests() -> None:
    modules = loaded_after("import proplet.sources")
    assert "proplet.sources.chunks" in modules
    assert not {m for m in modules if m.split(".")[0] in ("oras", "requests")}
