"""Float32 tolerances for tests that compare two computations running *different shapes*.

Where two sides run the same ops on the same shapes (a rerun, a save/load round trip, B = 0
adapters adding exact zeros), tests compare bit for bit and say so. Elsewhere (batched vs stepped
rows, one example vs a padded batch, another batch size), oneDNN/MKL pick kernels by matrix shape
and CPU (AVX2, AVX-512, AMX), so sums run in another order: measured up to 2.7e-5 apart in
log p(correct) after MiniLM's six layers on a Sapphire Rapids CPU. The tolerances leave ~4x room
for that and stay two orders of magnitude below what one wrong expert in one group changes on the
``distinct_checkpoint`` fixture (asserted in tests/test_env.py).
"""

LOGP_ATOL = 1e-4  # log-probabilities / rewards after six float32 transformer layers
PROB_ATOL = 1e-4  # router probabilities averaged over a group's modules and tokens
HIDDEN_ATOL = 1e-4  # hidden states after a few float32 layers (also relative: entries reach ~10)
