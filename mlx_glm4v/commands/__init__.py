"""The `mlx-glm4v` commands, one module each (or a family: what generate, chat and cache-prompt
share is in reply.py); `cli.py` registers them."""
