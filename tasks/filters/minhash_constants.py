"""The hashing constants shared by tasks/filters/minhash.py (Python and numpy, small batches) and
tasks/filters/minhash_kernels.py (numba): splitmix64's multipliers, FNV-1a 64, the word combiner."""

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_WORD_COMBINE = np.uint64(0x9E3779B97F4A7C15)
_S27, _S30, _S31, _S32 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(32)
_MAX32 = np.uint32(0xFFFFFFFF)
