"""Tensor and pipeline parallelism: a replica of several worker processes serving one model.

layout.py           who is who: ranks, stages, addresses
tensor_parallel.py  the transform that shards a built LlamaModel across a stage's TP ranks
pipeline.py         the transform that keeps one stage's layers, and the runner of a stage
handoff.py          ZeroMQ: plan bytes to every rank, hidden states stage to stage, liveness
replica.py          one rank's process: build its shard, then drive (rank 0) or follow
service.py          a rank's process: rank 0 serves the Worker service (server.py) around the
                    driver, the others follow it
"""
