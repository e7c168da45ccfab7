"""Building blocks of the model: tensor-parallel-ready linear and embedding layers, norms, rotary, attention."""
