"""Stage 0, what to run: the topology schema, reading YAML files with overrides, sweep plans."""
