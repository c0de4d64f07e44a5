"""Fine-tuning: training data, adapters, the trainer (DESIGN.md)."""
