"""The Cython/OpenMP backend: extension modules built by setup.py from ext/*.pyx."""
