"""`meshca agent --config FILE`: the node agent (keys made on the node, certificates by CSR, SDS on Unix sockets)."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from meshca.agent.admin import AgentAdmin
from meshca.agent.sds import SocketError
from meshca.agent.service import NodeAgent
from meshca.agent.settings import load_agent_settings
from meshca.cli.errors import CliError
from meshca.clock import system_clock
from meshca.files import describe_os_error
from meshca.listen import ListenError, check_bindable

_DESCRIPTION = """\
For each workload in FILE: generate its private key here (it never leaves this process), send a CSR to
meshca's CertificateService with the workload's JWT (token_file, re-read on every request), and serve the
certificate (`default`) and the trust bundle (`ROOTCA`) over SDS on the workload's Unix socket, to the
Envoy bootstrapped with `meshca bootstrap --agent-socket`. Certificates are renewed at meshca's policy
(half the lifetime ± jitter, at once in the hard zone); while meshca is unreachable the current ones keep
being served and the CSR is retried with capped backoff. With `admin: HOST:PORT`, GET /healthz answers 200
once every workload has a certificate that has not expired (503 and one line per workload otherwise), and
/status the workloads' certificates (never a key or a token) as JSON. See docs/agent.md.
"""


async def _run(config: Path) -> int:
    from meshca import logs

    log = logs.configure("info").getChild("agent")
    settings = load_agent_settings(config)
    if settings.admin is not None:  # a taken port is refused before any socket is touched
        check_bindable("admin", *settings.admin)
    agent = NodeAgent(settings, system_clock, log)
    try:
        await agent.start()
    except SocketError as error:
        raise CliError(str(error)) from None
    admin = AgentAdmin(agent, system_clock, log.getChild("admin"))
    if settings.admin is not None:
        try:
            admin.start(*settings.admin)
        except ListenError:  # taken since the check
            await agent.stop()
            raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("agent started: %d workload(s), meshca at %s", len(settings.workloads),
             ", ".join(f"{h}:{p}" for h, p in settings.meshca))
    await stop.wait()
    log.info("signal received: stopping")
    admin.stop()
    await agent.stop()
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    if args.config is None:
        raise CliError("meshca agent: --config FILE is required (or run `meshca agent enroll`)")
    return asyncio.run(_run(Path(args.config).expanduser().absolute()))


_ENROLL_DESCRIPTION = """A workload's side of the agent's `workloads_dir` (docs/agent.md, "On Kubernetes"), e.g. a native sidecar in a pod
whose DIR is the node's /run/meshca/workloads/<pod uid>: writes DIR/endpoints.yaml (the --endpoint values),
then copies the token file to DIR/token (mode 0600, atomically) and copies it again whenever it changes.
The agent then serves the workload on DIR/sds.sock and registers its endpoints. On SIGTERM or SIGINT it
removes DIR/token, DIR/endpoints.yaml and DIR/sds.sock, then DIR (unless DIR is a mount point): the
agent stops serving the workload and its endpoints leave EDS.
"""


def cmd_agent_enroll(args: argparse.Namespace) -> int:
    import threading

    from meshca import logs
    from meshca.agent.enroll import Enrollment, EnrollSettings, endpoints_of
    from meshca.fields import parse_duration

    try:
        endpoints = endpoints_of(args.endpoint)
    except ValueError as error:
        raise CliError(f"--endpoint: {error}") from None
    try:
        interval = parse_duration(args.interval)
    except ValueError as error:
        raise CliError(f"--interval: {error}") from None
    if interval.total_seconds() <= 0:
        raise CliError("--interval: must be positive")
    log = logs.configure("info").getChild("agent.enroll")
    settings = EnrollSettings(Path(args.dir).absolute(), Path(args.token_file).absolute(), endpoints, interval)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("enrolling in %s: token from %s, %d endpoint(s)", settings.directory, settings.token_file, len(endpoints))
    try:
        Enrollment(settings, log).run(stop)
    except OSError as error:
        raise CliError(f"--dir: {describe_os_error(error)}") from None
    return 0


def add_agent_parser(commands: Any) -> None:
    agent = commands.add_parser(
        "agent",
        help="node agent: keys made on the node, certificates by CSR, SDS to Envoy over Unix sockets",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    agent.add_argument("--config", metavar="FILE", help="the agent's YAML settings (docs/agent.md); required")
    agent.set_defaults(handler=cmd_agent)
    enroll = agent.add_subparsers(dest="agent_command", metavar="enroll").add_parser(
        "enroll",
        help="put a workload's token and endpoints in its directory under the agent's workloads_dir",
        description=_ENROLL_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    enroll.add_argument("--dir", required=True, metavar="DIR", help="this workload's directory under workloads_dir")
    enroll.add_argument("--token-file", required=True, metavar="FILE",
                        help="the workload's JWT (re-read every --interval; copied when it changes)")
    enroll.add_argument("--endpoint", action="append", default=[], metavar="SERVICE=ADDRESS:PORT",
                        help="an endpoint the agent registers for this workload (repeatable)")
    enroll.add_argument("--interval", default="1s", metavar="DURATION", help="how often the token is checked (1s)")
    enroll.set_defaults(handler=cmd_agent_enroll)
