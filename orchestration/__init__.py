"""The driver: training loop, Ray placement, data, sizes, config, weight-sync wiring, metrics, checkpoints."""
