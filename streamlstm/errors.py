"""Problems the user can fix: a bad config key, a missing or damaged model file, a topic shaped wrongly,
unreadable training data. Each module raises its own subclass; a command ends with exit code 2 and the
message, which names the key or file and what to do. One base, so the CLI catches them all without
importing the modules that raise them (a serve.workers supervisor stays without torch)."""


class UsageError(ValueError):
    """A problem the user can fix; the message names the key or file and what to do."""
