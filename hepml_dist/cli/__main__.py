"""`python -m hepml_dist.cli` runs the `hepml` command line (how Ray job entrypoints call it)."""

from hepml_dist.cli import main

main()
