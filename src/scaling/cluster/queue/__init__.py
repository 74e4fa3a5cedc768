"""``scaling queue``: experiments as Slurm jobs, with run records that say how each ended.

``submit`` checks the run like ``scaling run``, records it as ``queued``, writes ``RUN_DIR/job.sbatch``
(:mod:`.sbatch`) and hands it to ``sbatch``; inside the job :mod:`.job_step` records each attempt, and
``list``/``status``/``logs``/``cancel`` (:mod:`.listing`, :mod:`.logs`, :mod:`.cancel`) read the records and
what Slurm still knows (``squeue``, ``scontrol``: no accounting database is needed). Every Slurm command
runs through :mod:`.slurm` with a timeout and honours ``SLURM_CONF`` from the environment.
"""
