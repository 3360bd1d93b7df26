"""The prefill service: tokenizes, runs chunked prefill with KV compression, and ships the kept pages
to a decode service (`python -m prefill_service`)."""
