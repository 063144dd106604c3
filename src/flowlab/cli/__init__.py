"""Console entry points (thin Hydra applications): ``flowlab-train``, ``flowlab-eval``, ``flowlab-sample``
and ``flowlab-bench``. Each takes Hydra overrides as arguments; see conf/ and the README."""
