"""``scaling report``: plots of runs and one self-contained HTML page comparing them.

``reading`` finds a run's files and reads its metrics as series (also while the run is still writing),
``figures`` turns them into the final figures and the events to mark, ``plots`` draws the PNGs (matplotlib,
the ``report`` extra), ``html`` writes the page and ``command`` is the command line. Importing this package
imports none of them, so ``scaling --help`` stays fast and matplotlib stays optional.
"""
