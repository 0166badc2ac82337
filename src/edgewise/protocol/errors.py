class ProtocolError(ValueError):
    """A message or topic that does not follow the wire contract.

    Both sides count and log these with the topic; neither crashes on one. ``reason`` is a
    short stable code for counters: bad_topic, undecodable, too_large, newer_schema,
    invalid_fields, wrong_channel, device_mismatch.
    """

    def __init__(self, message: str, reason: str = "undecodable") -> None:
        super().__init__(message)
        self.reason = reason
