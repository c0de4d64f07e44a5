"""`mlx-glm4v serve`: an HTTP server on the engine that speaks OpenAI chat completions, OpenAI's
Responses API and Anthropic Messages.

- app.py: the ASGI app: routes, auth, limits, and the one path every request takes (media, the
  processor, the engine, the reply parser, streaming);
- neutral.py: what the dialects share: the neutral request and reply events, the field checks,
  `ApiError`, sealed reasoning, thinking effort;
- openai.py, responses.py, anthropic.py: the dialects: a body checked into the neutral request,
  the events rendered in the dialect's wire format, whole or streamed;
- formats.py: structured output (response formats, forced tool calls) as each dialect asks for it;
- media.py: the media a request names -> pixels, with every check on sources and sizes;
- metrics.py: the counters of /metrics;
- web/: the chat page served at /.
"""
