"""`python -m mlx_glm4v`: the `mlx-glm4v` command, as `mlx.launch` can start it on every rank."""

from .cli import main

main()
