"""Research workflow on top of training: predictions back to ROOT/parquet (`predict`), Ray Tune searches (`tune`)."""
