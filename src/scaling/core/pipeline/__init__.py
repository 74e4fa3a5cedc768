"""Pipeline parallelism: layer specs, partitioning, schedules as data, and the executing module."""
