"""The trainer's data: verl-schema prompt files, the built-in tasks, the supervised warm-start; plain arguments,
never the config."""
