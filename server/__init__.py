"""fedmerge: server."""
