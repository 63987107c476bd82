"""`meshca agent enroll`: a workload's side of `workloads_dir` — its token (kept current) and endpoints in its directory."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import yaml

from meshca.agent.discovery import ENDPOINTS, SOCKET, TOKEN
from meshca.agent.registration import TOKEN_LIMIT, Endpoint
from meshca.fields import parse_host_port
from meshca.files import describe_os_error, read_no_follow, write_atomic


@dataclass(frozen=True)
class EnrollSettings:
    directory: Path  # this workload's directory under the agent's workloads_dir
    token_file: Path  # the workload's JWT (e.g. its projected service-account token): copied, re-copied as it rotates
    endpoints: tuple[Endpoint, ...] = ()
    interval: timedelta = timedelta(seconds=1)  # how often the token file is checked for a new token


class Enrollment:
    """Publishes a workload into its directory (endpoints.yaml, then `token`, 0600, atomically), re-copies the
    token whenever it changes, and withdraws it (the agent stops serving it) on `withdraw`."""

    def __init__(self, settings: EnrollSettings, logger: logging.Logger) -> None:
        self.settings = settings
        self._log = logger
        self._problem: str | None = None
        self.copies = 0

    @property
    def token(self) -> Path:
        return self.settings.directory / TOKEN

    def publish(self) -> None:
        """The directory and endpoints.yaml (before the token: the agent starts the workload once `token` is there,
        with the endpoints it finds then), then the token. OSError if the directory or endpoints.yaml cannot be made."""
        directory = self.settings.directory
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        endpoints_file = directory / ENDPOINTS
        if self.settings.endpoints:
            document = {"endpoints": [
                {"service": e.service, "address": e.address, "port": e.port} for e in self.settings.endpoints
            ]}
            write_atomic(endpoints_file, yaml.safe_dump(document, sort_keys=False).encode(), 0o600)
        else:
            endpoints_file.unlink(missing_ok=True)
        self.sync_token()

    def sync_token(self) -> bool:
        """Copy the token file into the directory if what is there differs (or is missing). True if copied;
        a failure is logged (once per distinct cause, never the token) and retried at the next call."""
        try:
            try:
                source = self.settings.token_file.read_bytes()
            except OSError as error:
                raise OSError(error.errno, error.strerror, str(self.settings.token_file)) from None
            if not source.strip():
                raise OSError(errno.EINVAL, "is empty", str(self.settings.token_file))
            if len(source) > TOKEN_LIMIT:
                raise OSError(errno.EFBIG, f"is larger than {TOKEN_LIMIT} bytes", str(self.settings.token_file))
            try:
                current: bytes | None = read_no_follow(self.token, TOKEN_LIMIT)
            except OSError:
                current = None  # missing or unusable: replaced below (write_atomic renames over it)
            if current == source:
                self._recovered()
                return False
            write_atomic(self.token, source, 0o600)
        except OSError as error:
            line = f"token: {describe_os_error(error)}; retrying every {self.settings.interval.total_seconds():g} s"
            if line != self._problem:
                self._log.error(line)
                self._problem = line
            return False
        self._recovered()
        self.copies += 1
        self._log.info("token copied to %s (copy %d)", self.token, self.copies)
        return True

    def _recovered(self) -> None:
        if self._problem is not None:
            self._log.info("token: readable again")
            self._problem = None

    def withdraw(self) -> None:
        """Remove the token first (the agent stops the workload: its socket goes, its endpoints leave EDS), then
        endpoints.yaml and the socket, then the directory itself unless it is a mount point (in a pod it is:
        the kubelet's hostPath subPath; it is left empty)."""
        directory = self.settings.directory
        for name in (TOKEN, ENDPOINTS, SOCKET):
            try:
                (directory / name).unlink(missing_ok=True)
            except OSError as error:
                self._log.error("cannot remove %s: %s", directory / name, error.strerror)
        try:
            directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError as error:
            if error.errno == errno.EBUSY:
                self._log.info("%s is a mount point: left empty", directory)
            else:
                self._log.warning("%s: not removed (%s); the agent has stopped serving it", directory, error.strerror)
        self._log.info("withdrawn from %s", directory)

    def run(self, stop: threading.Event) -> None:
        """publish, re-copy the token every interval until `stop` is set, then withdraw."""
        try:
            self.publish()
            while not stop.wait(self.settings.interval.total_seconds()):
                self.sync_token()
        finally:
            self.withdraw()


def parse_endpoint(text: str) -> Endpoint:
    """SERVICE=ADDRESS:PORT; ValueError with one line otherwise."""
    service, sep, address = text.partition("=")
    if not sep or not service:
        raise ValueError(f"{text!r} is not SERVICE=ADDRESS:PORT")
    host, port = parse_host_port(address)
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: {port} is not a port (1..65535)")
    return Endpoint(service, host, port)


def endpoints_of(texts: Sequence[str]) -> tuple[Endpoint, ...]:
    return tuple(parse_endpoint(t) for t in texts)

