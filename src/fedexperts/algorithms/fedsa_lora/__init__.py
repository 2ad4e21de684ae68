"""FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463): LoRA's A shared and averaged, B kept on each client."""
