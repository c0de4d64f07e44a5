"""Finding, reading, checking and converting checkpoints."""
