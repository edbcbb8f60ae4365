"""The trainer's configuration: the schema, derived sizes, the fault grammar, the GPU table, config → component
configs; it imports nothing of the trainer above it."""
