"""The authors' Sinkhorn constants, shared by the eager loop (sinkhorn.py) and the fused solver
(sinkhorn_triton.py), which must reproduce the same potentials and the same early exit."""

# The authors' early exit: mean over the batch of the L1 change of the row potential.
AUTHORS_THRESHOLD = 0.1
# Their marginals carry a 1e-8 inside the log; kept so their potentials are reproduced.
AUTHORS_LOG_OFFSET = 1e-8
