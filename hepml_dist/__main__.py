"""`python -m hepml_dist` runs the `hepml` command line."""

from hepml_dist.cli import main

main()
