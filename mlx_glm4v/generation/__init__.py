"""One conversation: generation settings and loops, chat sessions, the reply parser, constraints,
boxes."""
