"""The data package's error type."""


class DataError(ValueError):
    """Bad data configuration or bad data; the message names the field and the fix."""
