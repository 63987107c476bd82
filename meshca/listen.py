"""Listening addresses: a port that cannot be bound is one line naming the setting and the address."""

from __future__ import annotations

import errno
import socket


class ListenError(Exception):
    """A listening address cannot be bound; the message names the setting (`listen`, `metrics_port`)."""


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_error(setting: str, host: str, port: int, error: OSError) -> ListenError:
    address = format_address(host, port)
    if error.errno == errno.EADDRINUSE:
        return ListenError(f"{setting}: {address} is already in use")
    return ListenError(f"{setting}: cannot listen on {address}: {error.strerror or error}")


def check_bindable(setting: str, host: str, port: int) -> None:
    """Raise ListenError unless `host:port` can be bound without SO_REUSEPORT.

    gRPC sets SO_REUSEPORT unless told not to and reports a failed bind only as "Failed to bind"
    (plus a C-core log line), so the address is tried first with a plain socket, which also says why.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ListenError(f"{setting}: cannot resolve {host!r}: {error.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as every server does: TIME_WAIT is no conflict
        try:
            probe.bind(sockaddr)
        except OSError as error:
            raise listen_error(setting, host, port, error) from None
