"""The GPUs `cluster.gpu` can name, and their memory (the planner's and the fit check's budget)."""

GPU_MEMORY_GIB = {"h100": 79.65, "h200": 140.4, "a100-80gb": 79.15, "a100-40gb": 39.39}
"""Total memory of each named GPU as nvidia-smi reports it (H100 SXM 81,559 MiB; H200 143,771 MiB; A100 SXM 81,051
and 40,337 MiB)."""
