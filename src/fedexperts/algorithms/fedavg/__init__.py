"""FedAvg (McMahan et al., 2017), FedProx (Li et al., 2020) and MoE-as-dense over any server rule."""
