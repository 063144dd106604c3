"""The benchmark behind ``flowlab-bench``: ``suite`` (models, the step, timing, measurements, goals), ``report``."""
