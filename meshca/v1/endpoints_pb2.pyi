from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("endpoints",)
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    def __init__(self, endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("service", "address", "port")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    service: str
    address: str
    port: int
    def __init__(self, service: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("spiffe_id", "accepted_services")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_SERVICES_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    accepted_services: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, spiffe_id: _Optional[str] = ..., accepted_services: _Optional[_Iterable[str]] = ...) -> None: ...
