"""Tensor side of moetune: models, drafters, tree verification, MoE budgeting, kernels."""
