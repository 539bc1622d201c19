"""Stage 3, the curious aggregator: attacker views, attack actors, scoring against the ground truth and
the leakage meter that logs it."""
