"""`python -m mlx_glm4v`: the `mlx-glm4v` command."""

from .cli import main

main()
