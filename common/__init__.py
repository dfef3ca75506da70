"""fedmerge: common."""
