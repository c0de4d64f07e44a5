"""Fine-tuning: conversations to training examples (data.py)."""
