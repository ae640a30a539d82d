"""`propeller proplet`: run the execution agent until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import click

from core.entrypoint import (
    LazyEpilogCommand,
    freeze_startup_objects,
    load_settings,
    settings_help,
    setup_logging,
    stop_on_signals,
)


def _epilog() -> str:
    from proplet.config import PropletSettings
    from proplet.federated import VARIABLES

    width = max(len(name) for name, _ in VARIABLES)
    federated = "\n".join(f"  {name.ljust(width)}  {meaning}" for name, meaning in VARIABLES)
    return settings_help(PropletSettings.describe()) + (
        "\n\n\bUpstream's credentials file is read when PROPLET_CONFIG_FILE names one (TOML, section "
        "PROPLET_CONFIG_SECTION, default 'proplet', keys tenant_id, entity_id, api_key, channel_id)."
        "\n\n\b\nFederated learning (upstream's names, no prefix; a task's env wins over the proplet's "
        "environment):\n" + federated
    )


@click.command("proplet", cls=LazyEpilogCommand, epilog_factory=_epilog)
@click.option("--mqtt-address", help="Broker URL (PROPLET_MQTT_ADDRESS).")
@click.option("--id", "entity_id", help="Proplet id (PROPLET_ENTITY_ID).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="PROPLET_LOG_LEVEL.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
def proplet_command(mqtt_address: str | None, entity_id: str | None, log_level: str | None, log_format: str) -> None:
    """Run a proplet: join the fleet over MQTT and run the WebAssembly tasks the manager sends.

    With no configuration it connects to mqtt://localhost:1883 with a generated id that is kept
    for the next start, and runs modules with the internal wasmtime runtime.
    """
    from proplet.config import PropletSettings

    settings = load_settings(PropletSettings.load, mqtt_address=mqtt_address, entity_id=entity_id or None,
                             log_level=log_level)
    setup_logging(settings.log_level, log_format)
    from proplet.config import unused_variables

    for sentence in unused_variables():
        logging.getLogger("proplet.config").warning("%s", sentence)
    try:
        asyncio.run(_run(settings))
    except KeyboardInterrupt:
        pass


async def _run(settings: Any) -> None:
    from proplet.agent import PropletAgent

    try:
        async with PropletAgent(settings) as agent:
            stop_on_signals(agent.request_shutdown)
            freeze_startup_objects()
            await agent.wait_closed()
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
