"""Training: the one loop (loop.py), task objects (tasks.py), losses, DDP helpers (ddp.py)."""
