"""Tunables, in one place.

Every knob that changes speed but never results lives here, so that benchmarks and users can
change it without touching kernel code (the stumpy ``config`` convention).
"""

#: Block size (query rows, key columns) used when a pattern is turned into a block-CSR layout for
#: the CPU backend. 64 x 64 float32 tiles fit the L1/L2 caches and are large enough for BLAS.
CPU_BLOCK_SIZE = (64, 64)

#: Block size used by the CUDA backend when it builds a layout from a pattern.
CUDA_BLOCK_SIZE = (64, 64)

#: Work chunks per Numba thread in the CPU kernels. More chunks balance uneven rows (causal
#: starts, global rows) better; fewer chunks allocate scratch tiles less often.
CPU_CHUNKS_PER_THREAD = 8

#: Keys processed per step of the online softmax in the token-level (CSR) CPU kernel.
CSR_KEY_CHUNK = 64

#: Above this many non-zeros a layout stores its column indices as int64 instead of int32.
#: (Tests lower it to check the switch without building a 2**31-entry layout.)
INT32_NNZ_LIMIT = 2**31 - 1

#: Largest number of entries of any single array a call may allocate before it is refused with a
#: MemoryError naming the size, as a fraction of the machine's physical memory.
MAX_MEMORY_FRACTION = 0.8
