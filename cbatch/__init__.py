"""cbatch: run Torque/PBS and Slurm jobs inside admin-approved container images.

Keep this module import-free: the job starter imports the package on every job start.
"""

__version__ = "0.1.0"
