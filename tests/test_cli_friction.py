"""CLI friction from issue 11: --version, help on every option, every command in the top-level help,
`meshca status --config` and `--admin host:port`."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from meshca.admin.server import AdminServer
from meshca.cli.main import build_parser, main
from meshca.clock import system_clock
from meshca.xds.status import ProxyRegistry


def options_without_help(parser: argparse.ArgumentParser, path: str) -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from options_without_help(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            yield f"{path} {'/'.join(action.option_strings) or action.dest}"


def leaf_commands(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from leaf_commands(sub, f"{path}{name} ")
                else:
                    yield f"{path}{name}", str(helps[name])


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"meshca {version('meshca')}"


def test_every_option_has_help_text() -> None:
    assert list(options_without_help(build_parser(), "meshca")) == []


def test_the_top_level_help_lists_every_command_with_its_one_line_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    commands = list(leaf_commands(parser))
    assert {"ca init", "ca status", "ca rotate", "dev init", "dev token", "serve", "status", "vault setup"} <= {
        name for name, _ in commands
    }
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    lines = capsys.readouterr().out.splitlines()
    for name, help_text in commands:
        assert any(line.split(None, len(name.split())) == [*name.split(), help_text] for line in lines), name


@pytest.fixture
def admin_port() -> Iterator[int]:
    server = AdminServer(CollectorRegistry(), ProxyRegistry(system_clock), logging.getLogger("test"))
    yield server.start("127.0.0.1", 0)
    server.stop()


def test_status_accepts_host_port_without_a_scheme(admin_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--admin", f"127.0.0.1:{admin_port}"]) == 0
    assert capsys.readouterr().out.strip() == "no proxies connected"


def test_status_reads_the_admin_address_from_the_serve_config(
    tmp_path: Path, admin_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "meshca.yaml"
    config.write_text(f"state_dir: ca\nmetrics_port: {admin_port}\nadmin_address: 0.0.0.0\n")
    assert main(["status", "--config", str(config), "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"


def test_status_config_without_metrics_port_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "meshca.yaml"
    config.write_text("state_dir: ca\n")
    assert main(["status", "--config", str(config)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"meshca: error: {config}: metrics_port: is not set, so `meshca serve` with this file has no admin endpoint"


def test_status_admin_and_config_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["status", "--admin", "127.0.0.1:1", "--config", "x.yaml"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_subcommand_usage_names_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ca", "rotate", "--help"])
    assert capsys.readouterr().out.startswith("usage: meshca ca rotate [-h]")
