"""The decode service: receives KV pages from prefill services into a head-sparse paged cache and
decodes every committed request with continuous batching (`python -m decode_service`)."""
