"""One module per data source, each with the functions listed in `convmixer_dist/data/source.py`."""
