"""gRPC services, engine, model runner and CLI of loraplex."""
