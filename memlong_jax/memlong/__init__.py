"""MemLong proper: its settings, the memory, retrieval backends, retrievers and the chunk scan."""
