"""Sub-commands of ``medsam``: thin argument parsing over the library, one module each."""
