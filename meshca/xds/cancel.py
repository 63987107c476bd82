"""Ending a grpc.aio server call with a status while a write is stuck (no public API does it)."""

from __future__ import annotations

import ctypes
import functools
import gc

import grpc
from grpc._cython import cygrpc

_HEAD = object.__basicsize__  # ob_refcnt and ob_type
_POINTER = ctypes.sizeof(ctypes.c_void_p)


def _pointer_at(obj: object, offset: int) -> int:
    return ctypes.c_void_p.from_address(id(obj) + offset).value or 0


@functools.cache
def _cygrpc_layouts_known() -> bool:
    """Whether cygrpc's objects are laid out as declared in its .pxd files: `grpc_call *call` is the
    only field of GrpcCallWrapper (RPCState's base), `RPCState _rpc_state` the first of
    _ServicerContext, and Call holds `grpc_call *c_call` then `list references`.
    """
    try:
        wrapper, state, context, call = cygrpc.GrpcCallWrapper, cygrpc.RPCState, cygrpc._ServicerContext, cygrpc.Call
    except AttributeError:
        return False
    if wrapper.__basicsize__ != _HEAD + _POINTER or not issubclass(state, wrapper):
        return False
    if context.__basicsize__ < _HEAD + _POINTER or call.__basicsize__ != _HEAD + 2 * _POINTER:
        return False
    probe = call()
    referents = gc.get_referents(probe)
    return (
        _pointer_at(probe, _HEAD) == 0
        and len(referents) == 1
        and _pointer_at(probe, _HEAD + _POINTER) == id(referents[0])
    )


def cancel_rpc(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> bool:
    """End the RPC now with this status, even while a write is stuck; False if it cannot be done.

    grpc.aio has no public API for this. abort() queues the status behind the unsent message
    (or fails with GRPC_CALL_ERROR_TOO_MANY_OPERATIONS while the pending write carries the
    initial metadata), and a handler that returns or is cancelled leaves the core call, and the
    message it holds, open until the peer goes away. gRPC core's grpc_call_cancel_with_status
    sends the status as trailers (HEADERS are not flow controlled) followed by RST_STREAM, and
    fails every pending operation. cygrpc exposes it only on Call, so the call pointer is lent to
    an empty Call, after checking the object layouts it is read through.
    """
    if not isinstance(context, cygrpc._ServicerContext) or not _cygrpc_layouts_known():
        return False
    states = [o for o in gc.get_referents(context) if isinstance(o, cygrpc.RPCState)]
    if len(states) != 1 or _pointer_at(context, _HEAD) != id(states[0]):
        return False
    c_call = _pointer_at(states[0], _HEAD)
    if not c_call:
        return False
    holder = cygrpc.Call()
    slot = ctypes.c_void_p.from_address(id(holder) + _HEAD)
    slot.value = c_call
    try:
        if holder.peer().decode() != context.peer():
            return False
        return holder.cancel(code.value[0], details) == cygrpc.CallError.ok
    finally:
        slot.value = None  # the Call must not unref a call it does not own
