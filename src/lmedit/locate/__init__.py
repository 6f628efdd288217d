"""Locating and preparing the pieces that locate-then-edit methods (ROME, MEMIT, AlphaEdit) need.

`lmedit.locate.corpus` reads text corpora, `lmedit.locate.stats` computes and caches the
second moments E[k kᵀ] of MLP keys. Import the submodules directly; this package imports
nothing heavy on its own.
"""
