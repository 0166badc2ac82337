class ProtocolError(ValueError):
    """A message or topic that does not follow the wire contract.

    Both sides count and log these with the topic; neither crashes on one.
    """
