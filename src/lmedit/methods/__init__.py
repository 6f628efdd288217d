"""Editing methods, one module each; importing a module registers its methods."""
