"""Drop-in replacements for other federated-learning frameworks' aggregation helpers.

``fedkern.compat.flwr`` mirrors Flower's helpers (same names, same signatures) and can
swap them into Flower's own strategies. Nothing here imports a framework until it is used.
"""
