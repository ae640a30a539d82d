"""Inline modules: the start message's `file`, already base64-decoded by the protocol decoder."""

from __future__ import annotations

from proplet.sources.base import WasmRef


class InlineSource:
    def accepts(self, ref: WasmRef) -> bool:
        return bool(ref.file)

    async def fetch(self, ref: WasmRef) -> bytes:
        return ref.file
