"""The worker service: owns a model shard, the paged KV cache and the kernels; executes plans."""
