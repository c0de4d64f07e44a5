"""The one exception type for problems a user can fix."""


class Glm4vError(Exception):
    """Bad input: a missing file, an unreadable image, a wrong option value.

    The message is one sentence naming the file or value and the problem; the CLI prints it
    without a traceback.
    """
