"""Errors a user can cause; the command line turns each into one sentence and exit code 2."""


class ConfigError(ValueError):
    """A mistake in the config or command line; the message is one sentence naming the fix."""


class SaveFailed(OSError):
    """A file could not be written (a full disk, a folder made read-only); the message is one
    sentence naming the fix, and the file that was there before is unchanged."""
