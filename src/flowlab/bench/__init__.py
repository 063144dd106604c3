"""flowlab.bench: the benchmark behind ``flowlab-bench`` / ``make bench``.

It times flowlab's training step as training runs it (FlowModule, conf/train.yaml's defaults) beside a
public-style reference Glow (experiments/bench/reference_glow.py), checks the paper's layer claims and
compares bits/dim of the training defaults with strict float32. ``core``: presets, models, the step,
timing and memory; ``suite``: the measurements and goals; ``report``: markdown and JSON.
"""
