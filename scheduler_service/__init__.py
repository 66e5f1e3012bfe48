"""The scheduler service: client API, request state, tokenization, KV block manager, policies."""
