"""Codes shared by the geometries and the Triton kernels (importable without Triton).

``COST_*`` says where a kernel's cost tile comes from; ``COEF_*`` which factor k_ij multiplies
the plan entries in ``softmin.triton.apply`` (see its module docstring).
"""

COST_DENSE, COST_SQEUCLIDEAN, COST_EUCLIDEAN = 0, 1, 2
COEF_ONE, COEF_COST, COEF_DCOST = 0, 1, 2

#: PointCloud cost names the kernels cover.
POINT_COSTS = {"sqeuclidean": COST_SQEUCLIDEAN, "euclidean": COST_EUCLIDEAN}
