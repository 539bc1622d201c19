"""Stage 1, the data: offline data sets and their partition among clients."""
