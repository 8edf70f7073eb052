"""The `driftlab` command line (`cli.main`); `python -m cli` is the same as `driftlab`."""
