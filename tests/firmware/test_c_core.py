"""The portable C core: its cmocka tests (with AddressSanitizer and UBSan) and cppcheck."""

from __future__ import annotations

import re
import shutil
import subprocess

from tests.firmware.conftest import FIRMWARE, make, need_c_toolchain
from tests.services import need


def test_cmocka_unit_tests_pass_under_sanitizers() -> None:
    need_c_toolchain()
    result = make("test")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"make test failed:\n{output}"
    # Every test binary ran and reported; none was skipped by an early exit.
    ran = re.findall(r"^== build/test/(test_\w+)$", result.stdout, re.MULTILINE)
    assert set(ran) >= {"test_wasmval", "test_b64_digest", "test_protocol", "test_assembler",
                        "test_modules", "test_proplet", "test_provision", "test_signature", "test_fuzz"}
    assert output.count("[  PASSED  ]") == len(ran)
    assert "FAILED" not in output
    # The sanitizers are really in the test binaries.
    for name in ran:
        linked = subprocess.run(["ldd", str(FIRMWARE / "build" / "test" / name)], capture_output=True,
                                text=True, check=True).stdout
        assert "libasan" in linked and "libubsan" in linked, f"{name} is not built with the sanitizers"


def test_cppcheck_finds_nothing() -> None:
    need(shutil.which("cppcheck") is not None, "cppcheck", "install it with `apt-get install cppcheck`")
    result = make("cppcheck")
    assert result.returncode == 0, f"cppcheck reported problems:\n{result.stdout}\n{result.stderr}"
