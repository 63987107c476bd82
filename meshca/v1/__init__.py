"""Generated gRPC and protobuf code for the meshca.v1 API (regenerate with `make protos`)."""
