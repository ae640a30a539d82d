"""What the manager reads off a module to place it (core.domain.module_needs): size, component or
not, WASI or not, from modules compiled from source in the repository."""

from __future__ import annotations

import pytest

from core.domain import MODULE_HEAD_BYTES, ModuleNeeds, Proplet, is_http_url, module_needs
from core.wasmbin import WasmParseError, imported_modules
from tests.wasmfixtures import wasm, with_custom_section


def test_a_wasi_program_a_pure_module_and_a_component_are_told_apart() -> None:
    hello, add, component = wasm("hello"), wasm("add"), wasm("greeter-component")
    assert "wasi_snapshot_preview1" in imported_modules(hello)
    assert imported_modules(add) == frozenset()
    assert module_needs(len(hello), hello) == ModuleNeeds(len(hello), component=False, wasi=True)
    assert module_needs(len(add), add) == ModuleNeeds(len(add), component=False, wasi=False)
    assert module_needs(len(component), component) == ModuleNeeds(len(component), component=True, wasi=False)


def test_the_head_read_back_after_a_restart_is_enough_for_a_real_program() -> None:
    """The manager reads only MODULE_HEAD_BYTES of a stored module back: clang puts the import
    section right after the type section, well within it, whatever follows (code, data, debug)."""
    hello = with_custom_section(wasm("hello"), "padding", bytes(100_000))
    assert module_needs(len(hello), hello[:MODULE_HEAD_BYTES]).wasi


def test_a_head_that_cuts_the_imports_off_or_a_broken_module_counts_as_no_wasi() -> None:
    """Unknown is no WASI: the proplet the task lands on says if it cannot run it (unsupported)."""
    padded_first = with_custom_section(b"\0asm\1\0\0\0", "first", bytes(MODULE_HEAD_BYTES)) + wasm("hello")[8:]
    assert not module_needs(len(padded_first), padded_first[:MODULE_HEAD_BYTES]).wasi
    assert module_needs(len(padded_first), padded_first).wasi
    with pytest.raises(WasmParseError):
        imported_modules(b"not wasm")
    assert module_needs(8, b"not wasm") == ModuleNeeds(8, component=False, wasi=False)


def test_embedded_proplets_fetch_no_http_url_unless_they_say_so() -> None:
    assert is_http_url("HTTPS://web.lan/add.wasm") and is_http_url("http://x/y")
    assert not is_http_url("reg.lan/httpd:1") and not is_http_url("blob:sha256:00")
    board = Proplet(id="b", metadata={"environment": "embedded"})
    assert not board.fetches_http
    assert Proplet(id="h", metadata={"environment": "embedded", "capabilities": ["http_fetch"]}).fetches_http
    assert Proplet(id="l", metadata={"environment": "binary"}).fetches_http


def test_embedded_proplets_provide_no_wasi_unless_they_say_so() -> None:
    needs = ModuleNeeds(100, component=False, wasi=True)
    board = Proplet(id="b", metadata={"environment": "embedded"})
    says_so = Proplet(id="w", metadata={"environment": "embedded", "capabilities": ["wasi"]})
    linux = Proplet(id="l", metadata={"environment": "binary"})
    assert not board.can_take(needs) and says_so.can_take(needs) and linux.can_take(needs)
    assert board.can_take(ModuleNeeds(100, component=False))
