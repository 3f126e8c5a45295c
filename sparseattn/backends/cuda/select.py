"""Content-based selection of the CUDA backend: the backend's hooks (top-k, LSH, k-means routing).

:class:`CUDASelection` is the mixin :class:`~sparseattn.backends.cuda.CUDABackend` inherits, as
the CPU backend inherits :class:`~sparseattn.backends.cpu.select.CPUSelection`. It hands CuPy
arrays to the Numba-CUDA kernels of :mod:`._select_kernels` (views, no copies) on CuPy's current
stream, allocating from CuPy's memory pool, and returns layouts with NumPy index arrays whose
device copies stay in the layout's cache. With ``config.CUDA_SELECT_FAST`` (the default) top-k
without ``within``, the LSH rows and every grouping by label take the CuPy paths of
:mod:`._select_fast` instead (cuBLAS, CUB, CUDA C++; same results). Importing it needs neither
CuPy nor Numba-CUDA.
"""

from __future__ import annotations

from ... import config
from ...layout import CSRLayout


def _fast():
    if not config.CUDA_SELECT_FAST:
        return None
    from . import _select_fast

    return _select_fast


class CUDASelection:
    """The content-based selection methods of :class:`~sparseattn.backends.cuda.CUDABackend` (see
    :class:`~sparseattn.backends.base.Backend` for their contracts): CuPy arrays in, the kernels of
    :mod:`._select_kernels` on CuPy's current stream, layouts with NumPy index arrays out (their device copies are
    left in the layout's cache, so attention on the GPU moves no index data)."""

    @staticmethod
    def _ctx():
        import cupy as cp

        from . import _select_kernels as K
        from ._device import numba_array, numba_stream

        def alloc(shape, dtype):  # CuPy's pool; the Numba view keeps the CuPy array alive
            return numba_array(cp.empty(shape, dtype))

        return K, numba_stream(), alloc, numba_array

    @staticmethod
    def _layout(res, n_q, n_k, heads):
        import cupy as cp

        indptr, out, d_indptr, d_out = res
        lay = CSRLayout(indptr, out, (n_q, n_k), heads, check=False)
        lay._cache[("cuda", cp.cuda.runtime.getDevice())] = {
            "indptr": cp.asarray(d_indptr), "indices": cp.asarray(d_out)[: out.shape[0]]}
        return lay

    def topk(self, q, k, top_k, within, causal):
        from ._device import device_layout

        Hq, Nq, _ = q.shape
        F = _fast()
        if F is not None and within is None:
            return self._layout(F.topk_dense(q, k, top_k, causal), Nq, k.shape[1], Hq)
        K, stream, alloc, nb = self._ctx()
        w_dev = None
        if within is not None and within.nnz:
            dev = device_layout(within)
            w_dev = (nb(dev["indptr"]), nb(dev["indices"]))
        res = K.topk(nb(q), nb(k), top_k, causal, stream, alloc, within=within, w_dev=w_dev)
        return self._layout(res, Nq, k.shape[1], Hq)

    def lsh_hash(self, x, rotations):
        import cupy as cp

        F = _fast()
        if F is not None:
            return F.lsh_hash(x, rotations)
        K, stream, alloc, nb = self._ctx()
        return cp.asarray(K.lsh_hash(nb(x), nb(rotations), stream, alloc))

    def lsh_select(self, q_buckets, k_buckets, n_buckets, bucket_size, causal):
        F = _fast()
        if F is not None:
            import cupy as cp

            res = F.lsh_select(cp.asarray(q_buckets), cp.asarray(k_buckets), n_buckets,
                               bucket_size, causal)
            if res is not None:
                return self._layout(res, q_buckets.shape[2], k_buckets.shape[2],
                                    q_buckets.shape[0])
        K, stream, alloc, nb = self._ctx()
        res = K.lsh_select(nb(q_buckets), nb(k_buckets), n_buckets, bucket_size, causal, stream,
                         alloc)
        return self._layout(res, q_buckets.shape[2], k_buckets.shape[2], q_buckets.shape[0])

    def kmeans_assign(self, x, centroids):
        import cupy as cp

        F = _fast()
        if F is not None:
            return F.kmeans_assign(x, centroids)
        K, stream, alloc, nb = self._ctx()
        labels, sims = K.kmeans_assign(nb(x), nb(centroids), stream, alloc)
        return cp.asarray(labels), cp.asarray(sims)

    def kmeans_update(self, q, k, q_labels, k_labels, centroids):
        import cupy as cp

        K, stream, alloc, nb = self._ctx()
        F = _fast()
        return cp.asarray(K.kmeans_update(nb(q), nb(k), nb(q_labels), nb(k_labels),
                                          nb(centroids), stream, alloc,
                                          sort=F.numba_group_sort if F else None))

    def routing_select(self, q_labels, k_labels, k_sims, n_clusters, capacity, causal):
        K, stream, alloc, nb = self._ctx()
        F = _fast()
        res = K.routing_select(nb(q_labels), nb(k_labels), nb(k_sims), n_clusters, capacity,
                               causal, stream, alloc, sort=F.numba_group_sort if F else None,
                               host=F.numba_host if F else None)
        return self._layout(res, q_labels.shape[1], k_labels.shape[1], q_labels.shape[0])
