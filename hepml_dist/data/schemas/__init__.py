"""Shipped conversion schemas (YAML): `hepml data convert --schema NAME` picks `NAME.yaml` from here."""
