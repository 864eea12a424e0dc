"""Demo apps and example scripts (not part of the installed package)."""
