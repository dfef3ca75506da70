"""fedmerge: client."""
