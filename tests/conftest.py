"""Settings for the whole test session, made before MLX starts.

MLX's CUDA backend rounds float32 matmuls through TF32 by default (MLX_ENABLE_TF32, read once
per process), so on a GPU a float32 row's logits depend on which matmul kernel its batch shape
picks, about 1e-3 apart: enough to flip a random-weight model's greedy near-ties. The tests
compare runs that batch differently (a row alone and in a batch, a prefix cached or not, a
preempted row recomputed) and mean float32 by float32, as on the CPU; the default stays the
user's (README, "CUDA")."""

import os

os.environ.setdefault("MLX_ENABLE_TF32", "0")
