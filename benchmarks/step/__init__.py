"""The worker's model step on one device: its time against the hardware floors (gpu_bench), where
a decode step's device time goes (decode_profile), bf16 agreement with transformers
(bf16_agreement); `harness` drives a runner without a scheduler (shared with the tests)."""
