"""`propeller proxy`: the OCI chunk proxy as a process (registered by propeller.cli).

This module is imported whenever `propeller` starts, so it imports nothing heavy at module level.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import click

from core.entrypoint import LazyEpilogCommand, load_settings, settings_help, setup_logging, stop_on_signals


def _epilog() -> str:
    from core.config import describe_settings
    from proplet.proxy import ProxySettings

    return settings_help(describe_settings(ProxySettings, "PROXY_"))


@click.command("proxy", cls=LazyEpilogCommand, epilog_factory=_epilog)
@click.option("--mqtt-address", help="Broker URL (PROXY_MQTT_ADDRESS).")
@click.option("--registry-url", help="Default registry and the one credentials are for (PROXY_REGISTRY_URL).")
@click.option("--chunk-size", type=int, help="Raw bytes per chunk (PROXY_CHUNK_SIZE).")
@click.option("--http-port", type=int, help="Serve GET /health on this port (PROXY_HTTP_PORT).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="PROXY_LOG_LEVEL.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
def proxy_command(mqtt_address: str | None, registry_url: str | None, chunk_size: int | None,
                  http_port: int | None, log_level: str | None, log_format: str) -> None:
    """Run the OCI proxy until SIGINT or SIGTERM.

    Proplets ask for OCI references (registry/repository:tag or @sha256:…) on registry/proplet;
    the proxy pulls the wasm layer with oras and publishes it in chunks: raw bytes on
    registry/server/binary for proplets that ask for them (ours), upstream's base64 JSON chunks on
    registry/server for the others. The reference's tag or digest is honoured. Registries are
    spoken to over HTTPS, unless PROXY_REGISTRY_INSECURE is set for PROXY_REGISTRY_URL; one on a
    loopback address over plain HTTP, unless PROXY_REGISTRY_URL names it with https:// or
    PROXY_REGISTRY_CA_CERT is set for it.
    """
    from proplet.proxy import ProxySettings

    settings = load_settings(ProxySettings, mqtt_address=mqtt_address, registry_url=registry_url,
                             chunk_size=chunk_size, http_port=http_port, log_level=log_level)
    setup_logging(settings.log_level, log_format)
    try:
        asyncio.run(_run(settings))
    except KeyboardInterrupt:
        pass


async def _run(settings: Any) -> None:
    from core.mqtt import BrokerUnavailable
    from proplet.proxy import OciProxy

    log = logging.getLogger("propeller.proxy")
    started = time.perf_counter()
    try:
        async with OciProxy(settings) as proxy:
            stop_on_signals(proxy.request_shutdown)
            try:
                await proxy.wait_connected(settings.mqtt_timeout)
                log.info("proxy ready in %.2f s; stop with Ctrl-C", time.perf_counter() - started)
            except BrokerUnavailable as exc:
                # Keep running: the bus reconnects with backoff and serves once the broker is back.
                log.warning("not connected yet: %s", exc)
            await proxy.wait_closed()
            log.info("shutting down")
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
