"""The merge engine: recipes, pre-flight checks, the per-tensor methods, the streaming writer,
and the in-place λ switch the hospital node uses."""
