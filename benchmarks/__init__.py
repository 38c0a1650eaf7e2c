"""asv benchmarks (attention.py) and scripts that measure attnbench itself (stability.py, side_by_side.py)."""
