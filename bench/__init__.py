"""memvidd's benchmarks: run each from the repository root as ``python -m bench.<name>``.

``common`` holds what they share; ``daemon_process`` the daemon they drive in a subprocess.
See ``bench/README.md`` for what each one measures.
"""
