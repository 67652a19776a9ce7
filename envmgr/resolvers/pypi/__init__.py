"""PyPI resolution: an index client, a resolvelib provider, and the target they resolve for."""
