"""Your nodes as a cluster: node setup and checks over SSH (``scaling nodes``), the Slurm-backed queue
(``scaling queue``).

Slurm is the scheduler, not a queue of our own: ``scaling`` writes the job scripts, submits them, reads
the state back and keeps the run records (:mod:`scaling.experiment.records`) that every other command reads.
"""
