"""core/ and proplet/ never pull in the console toolkit; the proplet never pulls in database drivers."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules(package: str) -> list[str]:
    return [package] + [f"{package}.{m.name}" for m in pkgutil.walk_packages([str(ROOT / package)])]


def _imported_after(modules: list[str]) -> set[str]:
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_core_never_imports_textual() -> None:
    loaded = _imported_after(_modules("core"))
    assert not {m for m in loaded if m == "textual" or m.startswith("textual.")}


def test_proplet_imports_neither_textual_nor_database_drivers() -> None:
    loaded = _imported_after(_modules("proplet"))
    forbidden = {"textual", "aiosqlite", "asyncpg", "core.service", "core.store", "core.api", "fastapi"}
    assert not {m for m in loaded if m.split(".")[0] in forbidden or m in forbidden}


def test_the_proplet_command_does_not_load_pydantic() -> None:
    # ~9.5 MB of an idle proplet's memory; its settings are msgspec (the proxy, run apart, may use it).
    loaded = _imported_after(["propeller.cli", "proplet.cli", "proplet.agent", "proplet.config"])
    assert not {m for m in loaded if m.split(".")[0] in {"pydantic", "pydantic_core", "pydantic_settings"}}


def test_the_proplet_command_does_not_load_the_firmware_tools() -> None:
    # ~0.5 MB of an idle proplet (configparser, shutil's compressors, ...): loaded when asked for only.
    loaded = _imported_after(["propeller.cli", "proplet.cli", "proplet.agent"])
    assert "propeller.firmware" not in loaded
    from propeller.cli import main

    out = subprocess.run([sys.executable, "-m", "propeller", "firmware", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "Build, flash, monitor and provision" in out.stdout, out.stderr
    assert {"firmware", "proplet", "proxy"} <= set(main.list_commands(main.make_context("propeller", [])))


def test_import_linter_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 2 kept, 0 broken" in out.stdout
