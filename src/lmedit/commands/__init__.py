"""Bodies of ``lmedit`` sub-commands that live outside ``lmedit.cli``; each module stays cheap to import."""
