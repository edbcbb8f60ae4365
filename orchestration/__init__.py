"""The trainer: the loop (`python -m orchestration.train`), its phases, the run's assembly on Ray, weight sync,
checkpoints, metrics and evaluation; below it `cluster/` (placement, start-up checks, faults, the fit check),
`config/` (the schema and what derives from it) and `data/` (prompt files, built-in tasks, warm-start)."""
