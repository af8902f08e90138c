"""The moetrain CLI, job configs and launchers (local simulated ranks, Ray, MPI, torchrun/Slurm env)."""
