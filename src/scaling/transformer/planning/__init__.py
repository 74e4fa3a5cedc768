"""The transformer's side of the planner: its parameter sizes and activation bytes on any layout, plans of
layouts (``scaling plan``), and the measured check that keeps the memory prediction honest."""
