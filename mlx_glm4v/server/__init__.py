"""`mlx-glm4v serve`: an HTTP server on the engine that speaks OpenAI chat completions, OpenAI's
Responses API and Anthropic Messages.

- app.py: the ASGI app put together, and `serve` (the drain on SIGTERM);
- state.py: the config and what the routes share: the models' registry, loading, warm prompts;
- middleware.py: auth, the body cap, a draining server's 503s, each in the path's dialect;
- run.py: the one path every dialect's request takes (media, the processor, the engine, the
  reply parser, streaming, keep-alives, timeouts);
- routes.py: the other routes (health, metrics, models, count_tokens, stored responses,
  /v1/layout_parsing, Ollama's descriptions);
- neutral.py: what the dialects share: the neutral request and reply events, the field checks,
  `ApiError`, sealed reasoning, thinking effort;
- openai.py, responses.py, anthropic.py: the dialects: a body checked into the neutral request,
  the events rendered in the dialect's wire format, whole or streamed;
- formats.py: structured output (response formats, forced tool calls) as each dialect asks for it;
- media.py: the media a request names -> pixels, with every check on sources and sizes;
- metrics.py: the counters of /metrics;
- web/: the chat page served at /.
"""
