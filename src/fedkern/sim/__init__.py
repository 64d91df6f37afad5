"""fedkern.sim: the federated learning loop on fedkern kernels (DESIGN.md section 6)."""
