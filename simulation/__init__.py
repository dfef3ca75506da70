"""fedmerge: simulation."""
