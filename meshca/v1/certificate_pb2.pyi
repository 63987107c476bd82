from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SignRequest(_message.Message):
    __slots__ = ("csr_pem", "ttl_seconds")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    csr_pem: str
    ttl_seconds: int
    def __init__(self, csr_pem: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class SignResponse(_message.Message):
    __slots__ = ("certificate_chain", "trust_bundle_pem", "spiffe_id", "expires_at", "not_before", "serial_number")
    CERTIFICATE_CHAIN_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    SERIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    certificate_chain: _containers.RepeatedScalarFieldContainer[str]
    trust_bundle_pem: str
    spiffe_id: str
    expires_at: int
    not_before: int
    serial_number: str
    def __init__(self, certificate_chain: _Optional[_Iterable[str]] = ..., trust_bundle_pem: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., expires_at: _Optional[int] = ..., not_before: _Optional[int] = ..., serial_number: _Optional[str] = ...) -> None: ...
