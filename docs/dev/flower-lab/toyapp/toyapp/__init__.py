"""Toy Flower 1.41 Message-API app."""
