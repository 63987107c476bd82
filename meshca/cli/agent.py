"""`meshca agent --config FILE`: the node agent (keys made on the node, certificates by CSR, SDS on Unix sockets)."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from meshca.agent.sds import SocketError
from meshca.agent.service import NodeAgent
from meshca.agent.settings import load_agent_settings
from meshca.cli.errors import CliError
from meshca.clock import system_clock

_DESCRIPTION = """\
For each workload in FILE: generate its private key here (it never leaves this process), send a CSR to
meshca's CertificateService with the workload's JWT (token_file, re-read on every request), and serve the
certificate (`default`) and the trust bundle (`ROOTCA`) over SDS on the workload's Unix socket, to the
Envoy bootstrapped with `meshca bootstrap --agent-socket`. Certificates are renewed at meshca's policy
(half the lifetime ± jitter, at once in the hard zone); while meshca is unreachable the current ones keep
being served and the CSR is retried with capped backoff. See docs/agent.md.
"""


async def _run(config: Path) -> int:
    from meshca import logs

    log = logs.configure("info").getChild("agent")
    settings = load_agent_settings(config)
    agent = NodeAgent(settings, system_clock, log)
    try:
        await agent.start()
    except SocketError as error:
        raise CliError(str(error)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("agent started: %d workload(s), meshca at %s", len(settings.workloads),
             ", ".join(f"{h}:{p}" for h, p in settings.meshca))
    await stop.wait()
    log.info("signal received: stopping")
    await agent.stop()
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    return asyncio.run(_run(Path(args.config).expanduser().absolute()))


def add_agent_parser(commands: Any) -> None:
    agent = commands.add_parser(
        "agent",
        help="node agent: keys made on the node, certificates by CSR, SDS to Envoy over Unix sockets",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    agent.add_argument("--config", required=True, metavar="FILE", help="the agent's YAML settings (docs/agent.md)")
    agent.set_defaults(handler=cmd_agent)
