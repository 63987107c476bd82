"""xDS: the SotW protocol state machine and its grpc.aio transport."""
