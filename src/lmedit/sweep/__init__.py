"""``lmedit sweep``: a grid of runs (methods × models × data × protocols × T × seeds × evaluation modes).

:mod:`lmedit.sweep.plan` expands and checks the grid; :mod:`lmedit.sweep.engine`
runs it in this process or as Ray tasks (the ``cluster`` extra), into the same run
folders ``lmedit run`` writes; :mod:`lmedit.sweep.status` tabulates a sweep's
progress and results (``lmedit report --sweep``).
"""
