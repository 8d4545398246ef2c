"""The gRPC front end: servicers, protobuf conversion, auth interceptors, TLS, status codes."""
