"""The `meshca` entry point: the top-level parser (each command group adds its own), one-line errors."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from meshca.ca.api import CaError
from meshca.cli.errors import CliError
from meshca.fields import ConfigError
from meshca.files import describe_os_error
from meshca.listen import ListenError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshca",
        usage="meshca [-h] [--version] COMMAND ...",
        description="Secrets and certificates for Envoy meshes: CA, JWT identity gate, xDS/SDS server.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"meshca {_version()}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS, prog="meshca"
    )

    from meshca.ca.vault.setup import add_vault_parser
    from meshca.cli.agent import add_agent_parser
    from meshca.cli.audit import add_audit_parsers
    from meshca.cli.bootstrap import add_bootstrap_parser
    from meshca.cli.ca import add_ca_parsers
    from meshca.cli.demo import add_demo_parser
    from meshca.cli.dev import add_dev_parser
    from meshca.cli.mesh import add_mesh_parser
    from meshca.cli.revoke import add_revoke_parsers
    from meshca.cli.serve import add_serve_parser
    from meshca.cli.status import add_status_parser
    from meshca.cli.taint import add_taint_parser
    from meshca.cli.trust import add_trust_parser

    ca = commands.add_parser("ca", help="certificate authority").add_subparsers(dest="ca_command", required=True)
    add_ca_parsers(ca)
    add_taint_parser(ca)
    add_dev_parser(commands)
    add_serve_parser(commands)
    add_demo_parser(commands)
    add_bootstrap_parser(commands)
    add_status_parser(commands)
    add_mesh_parser(commands)
    add_revoke_parsers(commands)
    add_vault_parser(commands)
    add_audit_parsers(commands)
    add_trust_parser(commands)
    add_agent_parser(commands)
    parser.epilog = "commands:\n" + "\n".join(
        f"  {name:<14} {help_text}" for name, help_text in command_list(parser)
    ) + "\n\n`meshca COMMAND --help` describes each one."
    return parser


def command_list(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, str]]:
    """(command, one-line help) for every command that runs something, e.g. ("ca rotate", "...")."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    if sub.get_default("handler") is not None:  # runs something itself too (`meshca agent`)
                        found.append((f"{prefix}{name}", helps[name]))
                    found += command_list(sub, f"{prefix}{name} ")
                else:
                    found.append((f"{prefix}{name}", helps[name]))
    return found


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meshca")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = int(args.handler(args))
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
        return status
    except BrokenPipeError:  # `meshca dev token | head -c 10`: the reader left; say nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    # ValueError includes InconsistentSnapshot
    except (CliError, ConfigError, CaError, FileExistsError, ValueError, ListenError) as error:
        print(f"meshca: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"meshca: error: {describe_os_error(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
