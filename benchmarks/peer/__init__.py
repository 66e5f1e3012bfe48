"""vLLM in our own harness: the same serving workload against vLLM's AsyncLLM (in-process) and
against our server (through gRPC), one sitting, one table. `python -m benchmarks.peer -h`."""
