"""Running and checking exported Infini-attention models."""
