"""xDS: what to send (wire framing, snapshots, the watch cache) and how to stream it (SotW, delta, grpc.aio server)."""
