"""Softmax teacher -> ARL2 hybrid: the paper's two-stage conversion recipe (method doc §3, §6)."""
