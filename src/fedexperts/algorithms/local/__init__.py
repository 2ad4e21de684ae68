"""Local-only training: each client trains its own copy of the scope, nothing is communicated."""
