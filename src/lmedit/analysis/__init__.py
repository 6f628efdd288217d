"""Analyses of where a model stores what it knows (causal tracing and its plots).

Import the submodules directly (``lmedit.analysis.tracing``, ``lmedit.analysis.plots``):
this package stays empty so that importing it costs nothing.
"""
