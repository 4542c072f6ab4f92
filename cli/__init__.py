"""The `kvweave` command line: the top layer, which composes the others (`python -m cli`)."""
