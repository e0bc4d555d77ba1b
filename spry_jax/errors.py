"""The package's user-error types: a bad config, bad data, a workdir that cannot be resumed.

The command lines (``spry_jax.main``, ``spry_jax.study``) print a :class:`UserError` as one line
and exit with status 2; any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake the user can fix; the message names the field (or file) and the fix."""


class ConfigError(UserError):
    """An invalid config value, or a config the machine cannot run (memory)."""
