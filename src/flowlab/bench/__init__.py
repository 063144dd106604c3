"""The benchmark behind ``flowlab-bench``: ``core`` (presets, models, the step, timing), ``suite`` (measurements,
goals), ``memory`` (activation memory per memory_saving mode), ``report`` (markdown, JSON)."""
