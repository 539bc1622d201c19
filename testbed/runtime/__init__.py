"""Stage 2, a round on Ray: models, the client simulation (vectorised and fused), update screening,
the worker pool, scheduling, the aggregation tree and the cluster the run uses."""
