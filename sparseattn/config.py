"""Tunables, in one place.

Every knob that changes speed but never results lives here, so that benchmarks and users can
change it without touching kernel code (the stumpy ``config`` convention).
"""

#: Block size (query rows, key columns) used when a pattern is turned into a block-CSR layout for
#: the CPU backend. 64 x 64 float32 tiles fit the L1/L2 caches and are large enough for BLAS.
CPU_BLOCK_SIZE = (64, 64)

#: Widest key tile of the CPU block kernel: runs of consecutive key blocks up to this many keys are
#: multiplied in one BLAS call (wider calls run closer to BLAS peak; 64x64 calls waste ~40%).
CPU_MAX_KEY_TILE = 512

#: Below this fill (allowed pairs / area of the stored blocks) the CPU backend runs a block layout
#: through its token-level CSR kernel instead of the tiled one: tiles would spend most of their
#: work on masked-out pairs (strided, fixed and finely dilated patterns at 64-blocks). Measured
#: block / token time at N=16384, 8 heads, D=64: fixed(128) (fill 0.14) 2.7, dilated(4, 2048)
#: (0.24) 1.28, dilated(3, 2048) (0.32) 0.99, dilated(2, 2048) (0.49) 0.61.
CPU_MIN_BLOCK_FILL = 0.3

#: Block size used by the CUDA backend when it builds a layout from a pattern.
CUDA_BLOCK_SIZE = (64, 64)

#: Work chunks per Numba thread in the CPU kernels. More chunks balance uneven rows (causal
#: starts, global rows) better; fewer chunks allocate scratch tiles less often.
CPU_CHUNKS_PER_THREAD = 8

#: Keys processed per step of the online softmax in the token-level (CSR) CPU kernel.
CSR_KEY_CHUNK = 64

#: Token-level CSR forward: how many keys ahead of the one being computed on the kernel prefetches
#: K rows (scattered keys defeat the hardware prefetchers). 8 was fastest at N=16384, top-64 keys.
CSR_PREFETCH_AHEAD = 8

#: ... but only when a layout's rows step by more than this many keys on average: local keys
#: (windows, dilations) are prefetched by the hardware, and software prefetches slow them down.
CSR_PREFETCH_MIN_GAP = 8

#: Token-level layouts with scattered keys whose K and V rows of one head take more than this many
#: bytes run one head at a time on all threads. The two-pass forward (``csr_forward_by_head``), top-64
#: keys, float32, D=64, against the one-pass kernel: 0.94x the time at N=8192 (4 MiB per head),
#: 0.76-0.93x at N=16384 (the shared host's load moves it), 0.45x at N=65536, but 1.2x at N=4096,
#: where two heads' rows still fit the shared L3. The backward (``csr_backward_by_head``): 0.91-0.95x
#: at N=16384 (0.99-1.14x while the host was loaded: a wash there), 0.94x at N=65536.
CSR_BY_HEAD_MIN_BYTES = 3 << 20

#: ... and at least this many query rows per thread (fewer rows leave threads idle there).
CSR_BY_HEAD_MIN_ROWS = 256

#: Entries (float32/float64 softmax weights) of the buffer that the two-pass kernel fills with
#: one segment of a head's rows at a time (at least the longest row is allocated).
CSR_WEIGHTS_BUFFER = 1 << 21

#: Block-CSR backward on the CPU: one fused query-major pass (5 tile products) in which every work
#: chunk adds its dk/dv contributions into partial buffers of its own, summed afterwards, as long
#: as those buffers hold at most this many times the key blocks of dk/dv (true for local patterns
#: such as sliding windows); beyond it, two passes (7 tile products, no extra memory).
CPU_BACKWARD_MAX_PARTIALS = 2.0

#: Above this many non-zeros a layout stores its column indices as int64 instead of int32.
#: (Tests lower it to check the switch without building a 2**31-entry layout.)
INT32_NNZ_LIMIT = 2**31 - 1

#: Largest number of entries of any single array a call may allocate before it is refused with a
#: MemoryError naming the size, as a fraction of the machine's physical memory.
MAX_MEMORY_FRACTION = 0.8

#: Tile geometry of the CUDA (Numba) block-CSR forward kernel per dtype: ``(TY, TX, RY, RX, DC)``:
#: a ``TY x TX`` thread grid, each thread an ``RY x RX`` register tile of scores (query tile
#: ``TY * RY`` rows, key tile ``TX * RX`` keys) and ``DC`` head dims per staged Q/K chunk. Sized so
#: that shared memory stays under the 48 KiB a Numba kernel may take statically.
CUDA_TILES = {"float32": (16, 16, 4, 4, 32), "float64": (8, 16, 4, 4, 16)}

#: Bytes of V a CUDA block-CSR tile stages in shared memory at once.
CUDA_V_TILE_BYTES = 16384

#: CUDA block-layout forward and backward: check every result for NaN/inf and redo such calls
#: with the token-level kernels, so that a NaN/inf input reaches exactly the outputs that depend
#: on it (a tile product spreads it through ``0 * NaN``). One device synchronisation per call;
#: False keeps calls asynchronous.
CUDA_CHECK_NONFINITE = True

#: Tile geometry ``(TY, TX, RY, RX, DC)`` of the CUDA block-CSR backward kernels (as ``CUDA_TILES``:
#: ``TY * RY`` rows per thread block, ``TX * RX`` columns per tile, ``DC`` dims per staged chunk).
CUDA_BWD_TILES = {"float32": (16, 16, 4, 4, 32), "float64": (8, 16, 4, 4, 16)}

#: Bytes of K, Q or dO rows the CUDA block-CSR backward stages at once for its accumulations
#: (with the P and dS tiles, the kernels stay under the 48 KiB of static shared memory).
CUDA_BWD_Z_TILE_BYTES = 8192

#: Threads per query row in the CUDA token-level (CSR) kernel; largest head dimension it takes.
CUDA_CSR_THREADS = 64
CUDA_CSR_MAX_D = 1024

#: Head dimensions (D == Dv) the float16 tensor-core kernel is compiled for; other shapes run the
#: float32 kernels. Warps per block of that kernel (each warp owns 16 query rows), tried in order:
#: the first whose ``16 * warps`` divides the layout's query block size is used. Blocks per SM
#: promised to the compiler (``__launch_bounds__``): more caps registers per thread.
CUDA_TC_HEAD_DIMS = (64, 128)
CUDA_TC_WARPS = (4, 2)
CUDA_TC_MIN_BLOCKS = 3

#: Tile (query rows, key columns) of the CPU top-k selection kernel: one BLAS product scores a
#: tile, then every score is compared once with its row's running threshold.
TOPK_BLOCK_SIZE = (128, 256)

#: Rows per task of the CPU hashing (LSH) and k-means assignment kernels: one BLAS product of
#: ``rows x D`` by ``D x buckets`` (or ``D x clusters``) per task.
SELECT_ROW_TILE = 256

#: Below this much work per decode step (cached keys x query heads x (D + Dv)) the CPU decode
#: kernel runs on the calling thread: waking Numba's pool costs more than the work.
DECODE_PARALLEL_WORK = 2**18

#: Head dimensions (D == Dv) of the CuPy float32 block-CSR kernel (exact float32 on the CUDA
#: cores, ``float4`` shared-memory tiles); other float32 shapes run the Numba-CUDA kernel.
CUDA_SIMT_HEAD_DIMS = (64, 128)

#: Keep the query tile of the float16 kernel in shared memory (fragments re-read with ldmatrix)
#: rather than in registers: 168 instead of 226 registers per thread, 3 blocks per SM instead of 2
#: (226 against 214 useful TFLOP/s on the H200, causal window W=4096, N=65536, D=128).
CUDA_TC_Q_IN_SMEM = True

#: TF32 tensor cores for float32 block-CSR forward passes on the CUDA backend (``mma.sync``
#: m16n8k8, operands rounded with ``cvt.rna.tf32.f32``, float32 accumulation). Off by default:
#: unlike every other knob here it changes results (a 10-bit mantissa; the measured error is in
#: docs/backends.rst). Also ``with sparseattn.use_tf32():`` and ``SPARSEATTN_TF32=1``, which win.
CUDA_ALLOW_TF32 = False

#: CUDA decode (one query per head against a KV cache, split-K): blocks aimed at per SM, keys at
#: least per split (fewer and the merge costs more than the split saves), and query heads of a
#: GQA group per block (each adds a score row to shared memory; 8 keep it under 16 KiB).
CUDA_DECODE_BLOCKS_PER_SM = 4
#: ... for the CUDA C++ decode kernel (float32, D in CUDA_SIMT_HEAD_DIMS): 8 was fastest on the
#: H200 at n=524288 (2.5 TB/s of K+V; 4: 2.0 TB/s).
CUDA_DECODE_FAST_BLOCKS_PER_SM = 8
CUDA_DECODE_MIN_SPLIT_KEYS = 256
CUDA_DECODE_HEADS_PER_BLOCK = 8
#: threads per block of the CUDA decode kernel (one key each per step; a power of two)
CUDA_DECODE_THREADS = 128

#: Tile geometry ``(TY, TX, RY, RX, DC)`` of the CUDA top-k selection kernel per dtype (as
#: ``CUDA_TILES``): ``TY * RY`` queries per block, each owned by one of the ``TY * TX`` threads
#: for the selection (so ``TY * TX >= TY * RY``), ``TX * RX`` keys scored per shared-memory tile.
CUDA_TOPK_TILES = {"float32": (8, 8, 8, 8, 32), "float64": (8, 8, 8, 4, 16)}

#: Tile geometry of the CUDA LSH-hashing and k-means-assignment kernels (a tile product of
#: ``TY * RY`` rows by ``TX * RX`` rotation columns or centroids, then a row argmax).
CUDA_ARGMAX_TILES = {"float32": (16, 8, 4, 4, 32), "float64": (16, 8, 4, 2, 16)}

#: Threads per block of the CUDA selection kernels that work per row, cluster or sort segment
#: (LSH rows, top-k within a layout, k-means update, bucket sort); rows of at most
#: ``CUDA_SELECT_SORT_CAP`` keys are sorted in shared memory, longer ones in place.
CUDA_SELECT_THREADS = 128
CUDA_SELECT_SORT_CAP = 2048

#: The selectors' fast GPU path (CuPy: cuBLAS score tiles and an exact per-row radix select for
#: top-k, CUB sorts for bucketing and k-means groups, a shared-memory bitmap per LSH row). Off:
#: the Numba-CUDA kernels above (the path the CUDA simulator tests). Same results either way.
CUDA_SELECT_FAST = True
#: Bytes of float scores the fast top-k holds at a time (tiles of queries against their keys);
#: threads per row of its select kernel; shared memory a row kernel may take (a top-k score row
#: or an LSH key bitmap; longer rows are read from global memory / take the Numba path).
CUDA_TOPK_SCORE_BYTES = 256 * 2**20
CUDA_TOPK_SELECT_THREADS = 256
CUDA_SELECT_SMEM_BYTES = 40 * 1024  # under 48 KiB with the kernels' static shared memory
#: The fast selectors copy large index arrays to the host through CuPy's pinned-memory pool
#: (about 20x the bandwidth of a pageable copy); the layout's arrays then hold pinned blocks.
CUDA_SELECT_PINNED = True
