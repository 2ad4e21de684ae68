"""FLEx's own baseline: FedAvg of attention LoRA plus one randomly chosen routed expert per layer."""
