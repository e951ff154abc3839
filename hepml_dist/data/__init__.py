"""Data: the sharded webdataset format, converters from ROOT/parquet, generators, the streaming loader, features."""
