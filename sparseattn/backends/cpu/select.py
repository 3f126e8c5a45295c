"""Content-based selection kernels of the CPU backend (Numba): top-k, LSH bucketing, k-means routing.

Every kernel here reads ``q`` and ``k`` (and small per-token arrays derived from them) and writes
the index arrays of a :class:`~sparseattn.layout.CSRLayout`. None of them ever holds an
``Nq x Nk`` array: scores are computed tile by tile and reduced on the spot.

* top-k (:func:`topk_dense`, :func:`topk_within`): one task is one (head, query block) for the
  dense case, one (head, query) for a ``within`` layout. Per query a buffer of at most
  ``2 * top_k + 8`` (score, key) pairs and a threshold, the ``top_k``-th best score at the last
  cut: a key is a candidate only if it beats the threshold, and a full buffer is cut back to
  ``top_k`` by a quickselect and a stable compaction (:func:`_keep_best`). Memory ``O(top_k)``
  per query; work one tile product and one (vectorised) comparison per (query, key).
* LSH (:func:`lsh_hash`, :func:`lsh_sort_keys`, :func:`lsh_rows`): Reformer's angular hash
  ``argmax([xR, -xR])`` by tile products, a counting sort of the keys by (bucket, position) per
  (head, round), and per query the union of the chunks its rounds land in.
* routing (:func:`kmeans_assign`, :func:`kmeans_update`, :func:`routing_clusters`,
  :func:`routing_rows`): spherical k-means on unit vectors and the per-cluster key lists.

Order of candidates: a pair ``(s, j)`` is *better* than ``(s', j')`` when ``s > s'``, or
``s == s'`` and ``j < j'``, a strict total order since keys are distinct. Keys stream in
ascending order, so a new key whose score equals the threshold loses to the pair holding it: the
test ``s > threshold`` is exact for ties too.

Kernels trust their inputs (validated by :mod:`sparseattn.select`); every read is in bounds.
Results do not depend on the thread count: every query row is computed by one task, in one order.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ... import config
from ...layout import CSRLayout, _index_dtype
from ._threads import balanced_chunks, blas_single_thread

# ----------------------------------------------------------------------------- selection helpers

# The buffers below always hold their pairs in ascending key order: keys are appended in
# ascending order and every cut keeps the survivors in place (a stable compaction), so ties need
# no index comparisons and a finished row needs no sort.


@njit(cache=True)
def _kth_largest(s, n, kk, a, b):
    """The ``kk``-th largest value of ``s[:n]`` (``1 <= kk <= n``); ``a``, ``b``: scratch of ``n``.

    Quickselect with a median-of-three pivot and branch-free passes (a count, then a compaction
    into the other scratch array): a branchy partition mispredicts on every other element of
    random scores, which made it the buffer's main cost.
    """
    for t in range(n):
        a[t] = s[t]
    src = a
    dst = b
    m = n
    target = kk - 1  # elements ranked before the answer in descending order
    while m > 8:
        x0 = src[0]
        x1 = src[m // 2]
        x2 = src[m - 1]
        pivot = max(min(x0, x1), min(max(x0, x1), x2))
        greater = 0
        equal = 0
        for t in range(m):
            greater += src[t] > pivot
            equal += src[t] == pivot
        if target < greater:
            w = 0
            for t in range(m):
                v = src[t]
                dst[w] = v
                w += v > pivot
            m = greater
        elif target < greater + equal:
            return pivot
        else:
            w = 0
            for t in range(m):
                v = src[t]
                dst[w] = v
                w += v < pivot
            target -= greater + equal
            m = m - greater - equal
        tmp = src
        src = dst
        dst = tmp
    for t in range(1, m):  # insertion sort, descending, of the last few
        v = src[t]
        u = t - 1
        while u >= 0 and src[u] < v:
            src[u + 1] = src[u]
            u -= 1
        src[u + 1] = v
    return src[target]


@njit(cache=True)
def _keep_best(s, idx, n, kk, a, b):
    """Cut the pairs ``(s[:n], idx[:n])`` (ascending ``idx``) to the ``kk`` best in place, order
    kept: every pair above the ``kk``-th largest score, then as many pairs equal to it as fit,
    the lowest keys first (the tie rule). Returns that ``kk``-th largest score (``kk < n``)."""
    kth = _kth_largest(s, n, kk, a, b)
    ties = kk
    for t in range(n):
        ties -= s[t] > kth
    w = 0
    for t in range(n):  # branch-free stable compaction (w <= t: reads stay ahead of writes)
        v = s[t]
        eq = v == kth
        keep = (v > kth) | (eq & (ties > 0))
        ties -= eq & keep
        s[w] = v
        idx[w] = idx[t]
        w += keep
    return kth


#: scores per vectorised threshold test in :func:`_scan_row`
_SCAN = 8

# no NaN can reach a kernel (inputs are finite and checked not to overflow), so comparisons and
# maxima may be vectorised; no 'ninf': -inf is the empty buffer's threshold
_FAST = {"nnan", "nsz"}


@njit(cache=True, inline="always")
def _scan_row(srow, lim, k0, cs, ci, n, thr, top_k, cap, sa, sb):
    """Offer the scores ``srow[:lim]`` of keys ``k0 + j`` to one row's buffer; return ``(n, thr)``.

    A key is a candidate only if its score beats ``thr``, the ``top_k``-th best score of the keys
    before it at the last cut (a key equal to it loses: its index is higher). Most scores lose
    once the threshold has settled, so each group of ``_SCAN`` scores is first tested as a whole
    through its maximum (vectorised); a group that may hold a candidate is appended branch-free:
    every score is written and the count advances only for winners. ``cap`` leaves ``_SCAN``
    slots of headroom above the point where the buffer is cut back to ``top_k``.
    """
    full = lim - lim % _SCAN
    for j0 in range(0, full, _SCAN):
        m = srow[j0]
        for j in range(j0 + 1, j0 + _SCAN):  # constant trip count: unrolled and vectorised
            m = max(m, srow[j])
        if not m > thr:
            continue
        if n > cap - _SCAN:
            thr = _keep_best(cs, ci, n, top_k, sa, sb)
            n = top_k
        for j in range(j0, j0 + _SCAN):
            v = srow[j]
            cs[n] = v
            ci[n] = k0 + j
            n += v > thr
    if full < lim:
        if n > cap - _SCAN:
            thr = _keep_best(cs, ci, n, top_k, sa, sb)
            n = top_k
        for j in range(full, lim):
            v = srow[j]
            cs[n] = v
            ci[n] = k0 + j
            n += v > thr
    return n, thr


@njit(cache=True, inline="always")
def _push(cs, ci, n, thr, top_k, cap, v, j, sa, sb):
    """Offer one candidate ``(v, j)``, ``v > thr``; a full buffer is cut first. Returns ``(n, thr)``."""
    if n == cap:
        thr = _keep_best(cs, ci, n, top_k, sa, sb)
        n = top_k
        if not v > thr:
            return n, thr
    cs[n] = v
    ci[n] = j
    return n + 1, thr


@njit(cache=True, inline="always")
def _emit_row(cs, ci, n, top_k, out, p, sa, sb):
    """Write the keys of the best ``min(n, top_k)`` pairs (ascending) to ``out[p:]``."""
    if n > top_k:
        _keep_best(cs, ci, n, top_k, sa, sb)
        n = top_k
    for t in range(n):
        out[p + t] = ci[t]


# ----------------------------------------------------------------------------- top-k


@njit(parallel=True, cache=True, fastmath=_FAST)
def topk_dense(q, k, top_k, causal, bq, bk, chunk_starts, indptr, out):
    """Top-``top_k`` keys of every query over all keys (causal: ``j <= i + Nk - Nq``).

    ``q`` ``(Hq, Nq, D)``, ``k`` ``(Hkv, Nk, D)``; one task is one (head, ``bq``-query block); key
    blocks of ``bk`` are scored with one tile product each. Row ``h * Nq + i`` of the result goes to
    ``out[indptr[row]:indptr[row + 1]]``, whose length the caller computed (``min(top_k, keys)``).
    """
    Hq, Nq, D = q.shape
    Hkv, Nk, _ = k.shape
    group = Hq // Hkv
    off = Nk - Nq
    nbq = (Nq + bq - 1) // bq
    cap = 2 * top_k + _SCAN
    for c in prange(chunk_starts.shape[0] - 1):
        s_buf = np.empty(bq * bk, q.dtype)
        cs = np.empty((bq, cap), q.dtype)
        ci = np.empty((bq, cap), np.int64)
        cnt = np.empty(bq, np.int64)
        thr = np.empty(bq, q.dtype)
        sa = np.empty(cap, q.dtype)
        sb = np.empty(cap, q.dtype)
        for t in range(chunk_starts[c], chunk_starts[c + 1]):
            h = t // nbq
            qb = t - h * nbq
            hk = h // group
            q0 = qb * bq
            nq = min(bq, Nq - q0)
            kend = Nk
            if causal:
                kend = min(Nk, q0 + nq + off)
            for i in range(nq):
                cnt[i] = 0
                thr[i] = -np.inf
            qt = q[h, q0 : q0 + nq]
            for k0 in range(0, kend, bk):
                nk = min(bk, kend - k0)
                s = s_buf[: nq * nk].reshape((nq, nk))
                np.dot(qt, k[hk, k0 : k0 + nk].T, s)
                for i in range(nq):
                    lim = nk
                    if causal:
                        lim = min(nk, q0 + i + off + 1 - k0)
                    if lim <= 0:
                        continue
                    cnt[i], thr[i] = _scan_row(s[i], lim, k0, cs[i], ci[i], cnt[i], thr[i],
                                               top_k, cap, sa, sb)
            for i in range(nq):
                row = h * Nq + q0 + i
                _emit_row(cs[i], ci[i], cnt[i], top_k, out, indptr[row], sa, sb)


@njit(parallel=True, cache=True)
def topk_within(q, k, top_k, causal, w_indptr, w_indices, w_heads, chunk_starts, indptr, out):
    """Top-``top_k`` keys of every query among the keys its row of a ``within`` layout allows.

    One task is one (head, query); the row's keys are gathered and scored one by one (they are
    scattered), so the work is ``O(nnz(within) * D)``.
    """
    Hq, Nq, D = q.shape
    Hkv, Nk, _ = k.shape
    group = Hq // Hkv
    off = Nk - Nq
    cap = 2 * top_k + _SCAN
    for c in prange(chunk_starts.shape[0] - 1):
        cs = np.empty(cap, q.dtype)
        ci = np.empty(cap, np.int64)
        sa = np.empty(cap, q.dtype)
        sb = np.empty(cap, q.dtype)
        for t in range(chunk_starts[c], chunk_starts[c + 1]):
            h = t // Nq
            i = t - h * Nq
            hk = h // group
            lh = h if w_heads > 1 else 0
            wrow = lh * Nq + i
            lim = i + off
            n = 0
            th = q.dtype.type(-np.inf)
            for p in range(w_indptr[wrow], w_indptr[wrow + 1]):
                j = w_indices[p]
                if causal and j > lim:
                    break  # indices ascend: no later key is allowed either
                v = 0.0
                for d in range(D):
                    v += q[h, i, d] * k[hk, j, d]
                v = q.dtype.type(v)
                if v > th:
                    n, th = _push(cs, ci, n, th, top_k, cap, v, j, sa, sb)
            _emit_row(cs, ci, n, top_k, out, indptr[t], sa, sb)


@njit(cache=True)
def within_row_counts(w_indptr, w_indices, w_heads, Hq, Nq, Nk, causal, top_k):
    """``min(top_k, allowed keys)`` per (head, query) row of a ``within`` layout."""
    off = Nk - Nq
    counts = np.empty(Hq * Nq, np.int64)
    for h in range(Hq):
        lh = h if w_heads > 1 else 0
        for i in range(Nq):
            wrow = lh * Nq + i
            lo = w_indptr[wrow]
            hi = w_indptr[wrow + 1]
            if causal:
                hi = lo + np.searchsorted(w_indices[lo:hi], i + off, side="right")
            counts[h * Nq + i] = min(top_k, hi - lo)
    return counts


# ----------------------------------------------------------------------------- LSH (Reformer)


@njit(parallel=True, cache=True)
def lsh_hash(x, rotations, rows, out):
    """Angular LSH buckets ``out[h, r, i] = argmax([x R_r, -x R_r])`` (first maximum wins).

    ``x`` ``(H, N, D)``, ``rotations`` ``(R, D, nb2)`` in ``x``'s dtype, ``out`` ``(H, R, N)``
    int32 with buckets in ``[0, 2 * nb2)``. One task is ``rows`` rows of one head, all rounds.
    """
    H, N, D = x.shape
    R, _, nb2 = rotations.shape
    ntiles = (N + rows - 1) // rows
    for t in prange(H * ntiles):
        h = t // ntiles
        r0 = (t - h * ntiles) * rows
        nr = min(rows, N - r0)
        buf = np.empty(rows * nb2, x.dtype)
        p = buf[: nr * nb2].reshape((nr, nb2))
        xt = x[h, r0 : r0 + nr]
        for r in range(R):
            np.dot(xt, rotations[r], p)
            for i in range(nr):
                best = p[i, 0]
                arg = 0
                for j in range(1, nb2):
                    if p[i, j] > best:
                        best = p[i, j]
                        arg = j
                for j in range(nb2):
                    if -p[i, j] > best:
                        best = -p[i, j]
                        arg = nb2 + j
                out[h, r, r0 + i] = arg


@njit(parallel=True, cache=True)
def lsh_sort_keys(buckets, n_buckets):
    """Stable counting sort of the keys of every (head, round) by bucket.

    Returns ``order`` ``(H, R, N)`` int64 (key positions sorted by (bucket, position)) and
    ``start`` ``(H, R, n_buckets + 1)`` int64 (where each bucket begins in ``order``).
    """
    H, R, N = buckets.shape
    order = np.empty((H, R, N), np.int64)
    start = np.zeros((H, R, n_buckets + 1), np.int64)
    for t in prange(H * R):
        h = t // R
        r = t - h * R
        b = buckets[h, r]
        st = start[h, r]
        for j in range(N):
            st[b[j] + 1] += 1
        for u in range(n_buckets):
            st[u + 1] += st[u]
        fill = st[:n_buckets].copy()
        o = order[h, r]
        for j in range(N):
            o[fill[b[j]]] = j
            fill[b[j]] += 1
    return order, start


@njit(cache=True, inline="always")
def _lsh_chunks(order_r, start_r, b, pos, bucket_size, n_chunks):
    """Chunk a query lands in (where it would sit among the sorted keys) and the one before it."""
    lo = start_r[b]
    hi = start_r[b + 1]
    ins = lo + np.searchsorted(order_r[lo:hi], pos, side="left")
    c = min(ins // bucket_size, n_chunks - 1)
    prev = c - 1 if c > 0 else n_chunks - 1  # Reformer's look-one-back wraps around
    return c, prev


@njit(cache=True)
def _sort_keys(a, tmp, count, n, passes):
    """Sort the non-negative ints ``a[:n]`` in place: insertion sort when short, else an LSD radix
    sort over ``passes`` bytes (``tmp``: scratch of ``n``, ``count``: of 256). A comparison sort
    mispredicts on every other comparison of these shuffled keys; the radix sort has no branch
    that depends on them."""
    if n <= 32:
        for t in range(1, n):
            v = a[t]
            u = t - 1
            while u >= 0 and a[u] > v:
                a[u + 1] = a[u]
                u -= 1
            a[u + 1] = v
        return
    src = a
    dst = tmp
    for ps in range(passes):
        shift = 8 * ps
        for b in range(256):
            count[b] = 0
        for t in range(n):
            count[(src[t] >> shift) & 255] += 1
        total = 0
        for b in range(256):
            c = count[b]
            count[b] = total
            total += c
        for t in range(n):
            v = src[t]
            d = (v >> shift) & 255
            dst[count[d]] = v
            count[d] += 1
        sw = src
        src = dst
        dst = sw
    if passes % 2 == 1:
        for t in range(n):
            a[t] = tmp[t]


@njit(parallel=True, cache=True)
def lsh_rows(q_buckets, order, start, Nk, bucket_size, causal, chunk_starts, indptr, out):
    """Keys of every (head, query): the union over rounds of its chunk and the previous one.

    Count pass when ``out`` is empty (``indptr`` then receives the row lengths at ``[row + 1]``);
    fill pass otherwise (keys ascending). A per-task stamp array de-duplicates keys found in
    several rounds in ``O(1)`` each.
    """
    Hq, R, Nq = q_buckets.shape
    Hkv = order.shape[0]
    group = Hq // Hkv
    off = Nk - Nq
    n_chunks = (Nk + bucket_size - 1) // bucket_size
    counting = out.shape[0] == 0
    passes = 1
    while passes < 8 and (Nk - 1) >> (8 * passes) > 0:
        passes += 1
    for c in prange(chunk_starts.shape[0] - 1):
        stamp = np.full(Nk, -1, np.int64)
        tmp = np.empty(0 if counting else 2 * bucket_size * R, out.dtype)
        count = np.empty(256, np.int64)
        for row in range(chunk_starts[c], chunk_starts[c + 1]):
            h = row // Nq
            i = row - h * Nq
            hk = h // group
            pos = i + off
            n = 0
            p = 0 if counting else indptr[row]
            for r in range(R):
                o = order[hk, r]
                ch, prev = _lsh_chunks(o, start[hk, r], q_buckets[h, r, i], pos, bucket_size,
                                       n_chunks)
                for u in range(2):
                    cc = ch if u == 0 else prev
                    if u == 1 and prev == ch:
                        break  # a single chunk: nothing before it
                    for s in range(cc * bucket_size, min(cc * bucket_size + bucket_size, Nk)):
                        j = o[s]
                        if (causal and j > pos) or stamp[j] == row:
                            continue
                        stamp[j] = row
                        if not counting:
                            out[p + n] = j
                        n += 1
            if counting:
                indptr[row + 1] = n
            else:
                _sort_keys(out[p : p + n], tmp, count, n, passes)


# ----------------------------------------------------------------------------- routing (k-means)


@njit(parallel=True, cache=True)
def kmeans_assign(x, centroids_t, rows, labels, sims):
    """Nearest centroid by dot product (first maximum wins) for unit vectors ``x``.

    ``x`` ``(Hx, N, D)``; ``centroids_t`` ``(Hc, D, C)`` (transposed, contiguous) with
    ``Hc % Hx == 0``: centroid head ``h`` reads ``x[h // (Hc // Hx)]``. Writes ``labels``
    ``(Hc, N)`` int32 and ``sims`` ``(Hc, N)`` (the winning similarity).
    """
    Hx, N, D = x.shape
    Hc, _, C = centroids_t.shape
    group = Hc // Hx
    ntiles = (N + rows - 1) // rows
    for t in prange(Hc * ntiles):
        h = t // ntiles
        r0 = (t - h * ntiles) * rows
        nr = min(rows, N - r0)
        buf = np.empty(rows * C, x.dtype)
        p = buf[: nr * C].reshape((nr, C))
        np.dot(x[h // group, r0 : r0 + nr], centroids_t[h], p)
        for i in range(nr):
            best = p[i, 0]
            arg = 0
            for j in range(1, C):
                if p[i, j] > best:
                    best = p[i, j]
                    arg = j
            labels[h, r0 + i] = arg
            sims[h, r0 + i] = best


@njit(parallel=True, cache=True)
def kmeans_update(q, k, q_labels, k_labels, centroids):
    """Spherical k-means step: each centroid becomes the normalised mean of its points (the
    queries and keys assigned to it); a centroid with no point, or a zero sum, stays as it was.

    ``q`` ``(Hq, Nq, D)``, ``k`` ``(Hkv, Nk, D)`` unit rows; ``centroids`` ``(Hq, C, D)``.
    One task per head, points in order: the sums do not depend on the thread count.
    """
    Hq, Nq, D = q.shape
    Hkv, Nk, _ = k.shape
    C = centroids.shape[1]
    group = Hq // Hkv
    new = np.empty_like(centroids)
    for h in prange(Hq):
        sums = np.zeros((C, D), np.float64)
        for i in range(Nq):
            c = q_labels[h, i]
            for d in range(D):
                sums[c, d] += q[h, i, d]
        hk = h // group
        for j in range(Nk):
            c = k_labels[h, j]
            for d in range(D):
                sums[c, d] += k[hk, j, d]
        for c in range(C):
            nrm = 0.0
            for d in range(D):
                nrm += sums[c, d] * sums[c, d]
            if nrm > 0.0:
                inv = 1.0 / np.sqrt(nrm)
                for d in range(D):
                    new[h, c, d] = sums[c, d] * inv
            else:
                for d in range(D):
                    new[h, c, d] = centroids[h, c, d]
    return new


@njit(parallel=True, cache=True)
def routing_clusters(k_labels, k_sims, n_clusters, cap):
    """Key list of every (head, cluster), capped at ``cap`` keys: the most similar to the centroid
    (ties: lower key). Returns ``keys`` ``(H, Nk)`` int64, packed by cluster, ascending within
    one, and ``start`` ``(H, C + 1)`` int64."""
    H, Nk = k_labels.shape
    keys = np.zeros((H, Nk), np.int64)
    start = np.zeros((H, n_clusters + 1), np.int64)
    for h in prange(H):
        lab = k_labels[h]
        count = np.zeros(n_clusters + 1, np.int64)
        for j in range(Nk):
            count[lab[j] + 1] += 1
        for c in range(n_clusters):
            count[c + 1] += count[c]
        fill = count[:n_clusters].copy()
        grouped = np.empty(Nk, np.int64)
        for j in range(Nk):
            grouped[fill[lab[j]]] = j
            fill[lab[j]] += 1
        sc = np.empty(Nk, k_sims.dtype)
        sa = np.empty(Nk, k_sims.dtype)
        sb = np.empty(Nk, k_sims.dtype)
        w = 0
        for c in range(n_clusters):
            lo = count[c]
            n = count[c + 1] - lo
            seg = grouped[lo : lo + n]
            if n > cap:  # keep the cap keys most similar to the centroid, still ascending
                for u in range(n):
                    sc[u] = k_sims[h, seg[u]]
                _keep_best(sc, seg, n, cap, sa, sb)
                n = cap
            for u in range(n):
                keys[h, w + u] = seg[u]
            w += n
            start[h, c + 1] = w
    return keys, start


@njit(parallel=True, cache=True)
def routing_rows(q_labels, keys, start, Nk, causal, chunk_starts, indptr, out):
    """Keys of every (head, query): its cluster's key list (causal: only ``j <= i + Nk - Nq``).

    Count pass when ``out`` is empty (lengths to ``indptr[row + 1]``), fill pass otherwise.
    """
    Hq, Nq = q_labels.shape
    off = Nk - Nq
    counting = out.shape[0] == 0
    for c in prange(chunk_starts.shape[0] - 1):
        for row in range(chunk_starts[c], chunk_starts[c + 1]):
            h = row // Nq
            i = row - h * Nq
            cl = q_labels[h, i]
            lo = start[h, cl]
            hi = start[h, cl + 1]
            if causal:
                hi = lo + np.searchsorted(keys[h, lo:hi], i + off, side="right")
            if counting:
                indptr[row + 1] = hi - lo
            else:
                p = indptr[row]
                for u in range(hi - lo):
                    out[p + u] = keys[h, lo + u]


# ----------------------------------------------------------------------------- drivers


def _indptr(counts):
    indptr = np.zeros(counts.shape[0] + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr


def _two_pass(kernel, args, n_rows, n_k, row_cost):
    """Run a count pass then a fill pass of a row kernel; return ``(indptr, indices)``."""
    chunks = balanced_chunks(np.ascontiguousarray(row_cost, dtype=np.int64))
    indptr = np.zeros(n_rows + 1, np.int64)
    # the count pass gets an empty array of the fill pass's usual dtype: one compiled signature
    kernel(*args, chunks, indptr, np.empty(0, _index_dtype(n_k, 0)))
    np.cumsum(indptr, out=indptr)
    out = np.empty(int(indptr[-1]), _index_dtype(n_k, int(indptr[-1])))
    if out.size:  # (an empty `out` would mean "count" to the kernel)
        kernel(*args, chunks, indptr, out)
    return indptr, out


class CPUSelection:
    """The content-based selection methods of :class:`~sparseattn.backends.cpu.CPUBackend`
    (see :class:`~sparseattn.backends.base.Backend` for their contracts)."""

    def topk(self, q, k, top_k, within, causal):
        Hq, Nq, _ = q.shape
        Nk = k.shape[1]
        off = Nk - Nq
        if within is None:
            avail = np.arange(Nq, dtype=np.int64) + off + 1 if causal else np.full(Nq, Nk, np.int64)
            counts = np.tile(np.clip(avail, 0, min(top_k, Nk)), Hq)
            indptr = _indptr(counts)
            out = np.empty(int(indptr[-1]), _index_dtype(Nk, int(indptr[-1])))
            if out.size:
                bq, bk = config.TOPK_BLOCK_SIZE
                nbq = -(-Nq // bq)
                # work of a query block ~ keys it scans (causal blocks stop at their diagonal)
                last = np.minimum(np.arange(1, nbq + 1, dtype=np.int64) * bq, Nq) + off
                work = np.clip(last, 0, Nk) + bk if causal else np.full(nbq, Nk + bk, np.int64)
                chunks = balanced_chunks(np.tile(work, Hq))
                with blas_single_thread():
                    topk_dense(q, k, top_k, causal, bq, bk, chunks, indptr, out)
        else:
            counts = within_row_counts(within.indptr, within.indices, within.heads, Hq, Nq, Nk,
                                       causal, top_k)
            indptr = _indptr(counts)
            out = np.empty(int(indptr[-1]), _index_dtype(Nk, int(indptr[-1])))
            if out.size:
                wlen = np.diff(within.indptr).reshape(within.heads, Nq)
                cost = np.broadcast_to(wlen, (Hq, Nq)).reshape(-1) + 4
                topk_within(q, k, top_k, causal, within.indptr, within.indices, within.heads,
                            balanced_chunks(np.ascontiguousarray(cost, np.int64)), indptr, out)
        return CSRLayout(indptr, out, (Nq, Nk), Hq, check=False)

    def lsh_hash(self, x, rotations):
        H, N, _ = x.shape
        out = np.empty((H, rotations.shape[0], N), np.int32)
        if out.size:
            with blas_single_thread():
                lsh_hash(x, rotations, config.SELECT_ROW_TILE, out)
        return out

    def lsh_select(self, q_buckets, k_buckets, n_buckets, bucket_size, causal):
        Hq, R, Nq = q_buckets.shape
        Nk = k_buckets.shape[2]
        if Nq == 0 or Nk == 0 or R == 0:
            return CSRLayout(np.zeros(Hq * Nq + 1, np.int64), np.zeros(0, np.int32), (Nq, Nk), Hq,
                             check=False)
        order, start = lsh_sort_keys(k_buckets, n_buckets)
        cost = np.full(Hq * Nq, 2 * bucket_size * R, np.int64)
        indptr, out = _two_pass(lsh_rows, (q_buckets, order, start, Nk, bucket_size, causal),
                                Hq * Nq, Nk, cost)
        return CSRLayout(indptr, out, (Nq, Nk), Hq, check=False)

    def kmeans_assign(self, x, centroids):
        Hc, C, _ = centroids.shape
        N = x.shape[1]
        labels = np.empty((Hc, N), np.int32)
        sims = np.empty((Hc, N), x.dtype)
        if labels.size:
            ct = np.ascontiguousarray(centroids.transpose(0, 2, 1))
            with blas_single_thread():
                kmeans_assign(x, ct, config.SELECT_ROW_TILE, labels, sims)
        return labels, sims

    def kmeans_update(self, q, k, q_labels, k_labels, centroids):
        return kmeans_update(q, k, q_labels, k_labels, centroids)

    def routing_select(self, q_labels, k_labels, k_sims, n_clusters, capacity, causal):
        Hq, Nq = q_labels.shape
        Nk = k_labels.shape[1]
        if Nq == 0 or Nk == 0:
            return CSRLayout(np.zeros(Hq * Nq + 1, np.int64), np.zeros(0, np.int32), (Nq, Nk), Hq,
                             check=False)
        keys, start = routing_clusters(k_labels, k_sims, n_clusters, capacity)
        sizes = np.diff(start, axis=1)
        cost = np.take_along_axis(sizes, q_labels.astype(np.int64), axis=1).reshape(-1) + 4
        indptr, out = _two_pass(routing_rows, (q_labels, keys, start, Nk, causal), Hq * Nq, Nk,
                                cost)
        return CSRLayout(indptr, out, (Nq, Nk), Hq, check=False)
