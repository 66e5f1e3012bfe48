"""Single kernels timed inside CUDA graphs (graph_timing): decode attention per backend
(attention_decode) and the Triton GEMV against cuBLAS (gemv_sweep)."""
