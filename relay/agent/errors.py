"""The errors of the device agent's inputs."""

from loa.streamer.errors import LoaError


class InputError(LoaError, RuntimeError):
    """A stream that cannot be played (bad URL, refused, unsupported, no data): the pipeline
    reports it and tries the next transport or again later, so it is `unavailable`."""

    kind = "unavailable"
