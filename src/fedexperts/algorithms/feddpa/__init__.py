"""FedDPA (Yang et al., NeurIPS 2024, arXiv 2403.19211): a global and a local LoRA, mixed per test example.

The config is in :mod:`.config` (torch-free), the per-example mixing in :mod:`.mixing`, the
instance-wise weights in :mod:`.weighting`, the algorithm in :mod:`.algorithm`.
"""
