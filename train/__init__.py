"""MemLong adaptation training: python -m train.run --config NAME [--set key=value ...]."""
