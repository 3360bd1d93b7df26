"""The coordinator: the client-facing gRPC API. It picks a prefill and a decode service per request,
relays tokens and passes cancellation and deadlines on; KV never passes through it
(`python -m coordinator`)."""
