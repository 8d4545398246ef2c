"""The engine: requests, scheduler, KV block manager, sampler, step loop. It knows nothing about gRPC."""
