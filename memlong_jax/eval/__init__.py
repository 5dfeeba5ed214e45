"""Evaluation on top of the model: the scoring protocol, generation with memory, ICL."""
