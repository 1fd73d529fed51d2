"""The errors of the device agent's inputs."""


class InputError(RuntimeError):
    """A stream that cannot be played (bad URL, refused, unsupported, no data)."""
