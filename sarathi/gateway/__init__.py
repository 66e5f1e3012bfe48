"""The OpenAI-compatible HTTP gateway in front of the gRPC API (`sarathi gateway`)."""
