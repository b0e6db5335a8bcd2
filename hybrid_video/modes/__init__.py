"""One driver per --mode: read the config, call the library, write files and reports."""
