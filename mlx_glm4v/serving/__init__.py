"""Many conversations at once: the engine, its rows and prefix cache, several ranks in lockstep."""
