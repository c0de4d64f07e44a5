"""`mlx-glm4v serve`: an OpenAI-compatible HTTP server on the engine.

app.py routes, auth, limits and streaming; media.py turns the media a request names into
pixels with every check in one place; openai.py holds the API's shapes: the request parsed and
checked, replies, errors and tool calls; metrics.py the counters of /metrics.
"""
