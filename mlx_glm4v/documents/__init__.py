"""Documents: pages -> layout regions (-> task prompts, engine rows, Markdown and JSON)."""
