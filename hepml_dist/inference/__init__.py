"""Using trained models: `hepml predict` (outputs back to ROOT/parquet) and `hepml export` (ONNX)."""
