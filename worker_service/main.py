"""The worker process: load the model (or this rank's part of it), build the runner, serve."""

from __future__ import annotations

import time

import torch

from sarathi_common.model_spec import ModelSource, resolve
from worker_service import memory
from worker_service.attention import make_backend
from worker_service.config import WorkerConfig
from worker_service.models.config import ModelConfig
from worker_service.models.loader import hf_config_for, load_model
from worker_service.runner import ModelRunner
from worker_service.server import serve_worker


def run_worker(config: WorkerConfig) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"worker: --device {config.device}, but torch {torch.__version__} finds no CUDA "
                         "device here; pass --device cpu")
    dtype = getattr(torch, config.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    source = resolve(config.model)
    if config.world_size > 1:
        from worker_service.parallel.local import start_local_ranks
        from worker_service.parallel.service import run_replica_worker

        if config.rank == 0 and config.replica_addresses is None and config.dist_init is None:
            check_layout(source, config)       # before any rank starts: one line, not N tracebacks
            config = start_local_ranks(config)  # the whole replica on this host

        def load(rank_device, part):  # each rank reads only its part, on its own GPU
            return load_model(source, make_backend(config.attention, rank_device), rank_device, dtype,
                              seed=config.weights_seed, part=part)

        return run_replica_worker(config, load, device, dtype)
    start = time.monotonic()
    backend = make_backend(config.attention, device)
    model = load_model(source, backend, device, dtype, seed=config.weights_seed)
    weight_bytes = memory.weight_bytes(model)
    graphs = device.type == "cuda" and config.cuda_graphs
    runner = ModelRunner(model, device, dtype, cuda_graphs=graphs,
                         hybrid_graph_tokens=config.graph_tokens(graphs))
    print(f"worker: {source.name} on {device} ({dtype}), {weight_bytes / 1e6:.0f} MB of weights, "
          f"loaded in {time.monotonic() - start:.1f} s", flush=True)
    serve_worker(runner, config, weight_bytes)


def check_layout(source: ModelSource, config: WorkerConfig) -> None:
    """Exits with one line when the model does not split into the layout asked for."""
    from worker_service.parallel.layout import split_layers
    from worker_service.parallel.tensor_parallel import check_shardable

    model = ModelConfig.from_hf(hf_config_for(source), source.name)
    try:
        check_shardable(model, config.tensor_parallel_size)
        split_layers(model.num_layers, config.pipeline_parallel_size)
    except ValueError as e:
        raise SystemExit(f"worker: {source.name} does not fit --tensor-parallel-size "
                         f"{config.tensor_parallel_size} --pipeline-parallel-size "
                         f"{config.pipeline_parallel_size}: {e}") from None
