"""Evaluation of trained DCGANs: the paper's representation-learning protocols and sample checks."""
