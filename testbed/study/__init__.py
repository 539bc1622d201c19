"""The mixing-gradients study: paired leakage audits on shared checkpoints, over seeds, with intervals."""
