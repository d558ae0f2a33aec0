"""Building a supernet: teacher conversion, teacher traces, stochastic distillation, targeted SFT."""
