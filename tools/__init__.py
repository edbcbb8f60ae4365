"""The commands a user runs by hand (demo, evaluate, plan, compare, plot, credit, the local cluster, the sweep
callback); the trainer never imports them."""
