"""Data: the sharded webdataset format (manifest, writer, reader), converters from ROOT/parquet, feature builders,
reweighting, and the streaming loader (`loader.open_stream`). Generators are in hepml_dist.generate."""
