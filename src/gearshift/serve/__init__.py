"""Serving: an engine with per-request placements in one batch, self-speculative decoding, an OpenAI-style server."""
