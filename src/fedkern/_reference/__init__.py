"""The numpy reference backend: readable kernels that the fast backends are tested against."""
