"""The trainer's cluster machinery: placement groups, CPU binding, start-up checks, the run's environment,
stack dumps, fault injection, the GPU memory fit check."""
