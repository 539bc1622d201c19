"""Stage 3, the curious aggregator: attacker views, attack actors, scoring against the ground truth and
the audit queue that collects the scores and the leakage log that records them."""
