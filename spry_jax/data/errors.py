"""The data package's error type."""

from spry_jax.errors import UserError


class DataError(UserError):
    """Bad data configuration or bad data; the message names the field and the fix."""
