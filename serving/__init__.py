"""Serving: engine (requests, scheduler, KV cache, model runner), targets, attention backends, speculative decoding,
OpenAI-compatible server."""
