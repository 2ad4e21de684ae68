"""FLEx: personal experts grafted from pretrained ones (arXiv 2506.00965).

The config is in :mod:`.config` (torch-free), the algorithm in :mod:`.algorithm`.
"""
