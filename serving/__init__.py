"""What the gRPC services share: settings from flags and env, the engine thread, the error interceptor,
server start/stop with health and reflection, proto <-> engine conversions, incremental detokenization."""
