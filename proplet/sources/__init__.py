"""How the proplet gets its wasm modules: one `WasmSource` per delivery strategy, one fetcher.

```python
fetcher = ModuleFetcher([InlineSource(), HttpSource(), ChunkSource(bus.publish, topics.registry_request)])
data, digest = await fetcher.fetch(WasmRef(task_id, image_url=..., file=..., digest=...))
```
"""

from proplet.sources.base import (
    DEFAULT_MAX_MODULE_BYTES,
    DigestingSource,
    FetchError,
    ModuleTooLarge,
    WasmRef,
    WasmSource,
)
from proplet.sources.chunks import ChunkCounters, ChunkSource
from proplet.sources.fetcher import ModuleFetcher, SignatureVerifier
from proplet.sources.http import HttpSource
from proplet.sources.inline import InlineSource

__all__ = [
    "DEFAULT_MAX_MODULE_BYTES",
    "ChunkCounters",
    "ChunkSource",
    "DigestingSource",
    "FetchError",
    "HttpSource",
    "InlineSource",
    "ModuleFetcher",
    "ModuleTooLarge",
    "SignatureVerifier",
    "WasmRef",
    "WasmSource",
]
