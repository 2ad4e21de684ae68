"""FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313): LoRA's A frozen at a seeded init, only B trained and shared."""
