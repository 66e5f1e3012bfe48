"""The host side's cost around the model: the device's wait for the scheduler between steps
(step_overhead), the scheduler's time per iteration (policy_overhead), the engine link's codec
(engine_link_codec), streaming through the HTTP gateway (gateway_overhead)."""
