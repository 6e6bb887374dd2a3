"""The one exception type for problems a user can cause and fix.

Bad configuration, unreadable or unsuitable DICOM, missing weights, wrong checkpoint: raise
`MolreError` (or a subclass) with a message that names the file / key / tag and says what to do.
The CLI prints the message without a traceback; the node turns it into a DICOM status and an
audit row. Programming errors stay ordinary exceptions so they are not mistaken for user errors.
"""

from __future__ import annotations


class MolreError(Exception):
    """A user-caused, user-fixable problem. The message is shown verbatim to the user."""


class ConfigError(MolreError):
    """Invalid configuration (unknown key, bad value)."""


class SeriesError(MolreError):
    """A DICOM series cannot be turned into a volume (the message gives the reason and the tag)."""


class WeightsError(MolreError):
    """Backbone or checkpoint weights are missing or do not match the architecture."""


class CheckpointError(MolreError):
    """A checkpoint is missing, malformed, or does not match backbone / catalog."""
