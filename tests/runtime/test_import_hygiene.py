"""The runtime runs on small edge boxes: importing it pulls in no console toolkit or database driver."""

from __future__ import annotations

import subprocess
import sys


def test_runtime_imports_no_textual_or_database_drivers() -> None:
    code = ("import sys, proplet.runtime; "
            "bad = [m for m in ('textual', 'aiosqlite', 'asyncpg', 'console') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
