"""The reference device runtime (`claw device pair`, `claw agent run`), as a small library.

It speaks the agent protocol (docs/protocol.md, frames from claw.protocol) and imports
nothing from Django, so other agent frameworks can reuse it in a few lines:

    from claw.device import AgentClient, load_config, builtin_toolkits

    config = load_config()
    client = AgentClient(config=config, name="builder", toolkits=builtin_toolkits(["shell"]))
    asyncio.run(client.run())
"""

from claw.device.client import AgentClient, Backoff, FatalConnectionError, Outbox
from claw.device.config import DeviceConfig, PairingError, load_config, pair, save_config
from claw.device.toolkits import (
    ToolContext,
    ToolError,
    Toolkit,
    available_toolkits,
    builtin_toolkits,
    load_toolkits,
)

__all__ = [
    "AgentClient",
    "Backoff",
    "DeviceConfig",
    "FatalConnectionError",
    "Outbox",
    "PairingError",
    "ToolContext",
    "ToolError",
    "Toolkit",
    "available_toolkits",
    "builtin_toolkits",
    "load_config",
    "load_toolkits",
    "pair",
    "save_config",
]
