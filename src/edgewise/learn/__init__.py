"""Learning from the fleet: federated rounds over devices that come and go, and differential privacy.

- :mod:`.aggregate`: validating, clipping and aggregating model updates (FedAvg, coordinate-wise median,
  trimmed mean) and the buffered asynchronous aggregator (FedBuff) that never waits for a device that left.
- :mod:`.dp`: DP-FedAvg noise and privacy accounting with Google's ``dp-accounting`` (RDP), a budget that
  refuses a round it cannot afford, and local privatization of telemetry aggregates.
- :mod:`.local`: what a device runs: training of a softmax head in numpy (devices without torch), FedProx.
- :mod:`.partition`: non-IID splits of a data set across simulated devices (class skew).
- :mod:`.simulate`: rounds over a simulated fleet with offline devices: the evidence in docs/learn.md.
"""
