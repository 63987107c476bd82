from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class WatchTrustRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrustMaterial(_message.Message):
    __slots__ = ("version", "bundle_pem", "crl_pem", "ca_generation")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    CRL_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_GENERATION_FIELD_NUMBER: _ClassVar[int]
    version: str
    bundle_pem: str
    crl_pem: _containers.RepeatedScalarFieldContainer[str]
    ca_generation: int
    def __init__(self, version: _Optional[str] = ..., bundle_pem: _Optional[str] = ..., crl_pem: _Optional[_Iterable[str]] = ..., ca_generation: _Optional[int] = ...) -> None: ...
