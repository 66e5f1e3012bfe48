"""Tensor and pipeline parallelism: a replica of several worker processes serving one model.

layout.py           who is who: ranks, stages, addresses
tensor_parallel.py  the transform that shards a built LlamaModel across a stage's TP ranks
pipeline.py         the transform that keeps one stage's layers, and the runner of a stage
handoff.py          ZeroMQ: plan bytes to every rank, hidden states stage to stage, liveness
replica.py          one rank's process: build its shard, then drive (rank 0) or follow
service.py          rank 0's gRPC Worker service, forwarding plan bytes as they arrived
"""
