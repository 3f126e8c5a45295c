"""Train a sparse-attention model in plain NumPy on a long-range retrieval task.

Each sequence starts with a small table of ``(key, value)`` entries; every later position holds a
key and must output that key's value, up to 4096 tokens after the table. The model is one
attention layer (linear maps for q, k, v and the output) whose pattern is
``sinks(table) | sliding_window(64)``: every query sees the table (attention sinks) and its 64 most
recent neighbours, 72 keys instead of 4096. Gradients come from :mod:`sparseattn.autograd`; the
optimiser is a few lines of Adam. A model whose pattern is the sliding window alone cannot see the
table from far away and stays at chance (``--compare`` trains it too).

Run: ``python docs/examples/train_numpy.py`` (100 steps, about 35 s of CPU time).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import sparseattn as sa

N_KEYS, N_VALUES, TABLE = 16, 16, 8
FEATURES = N_KEYS + N_VALUES + 2  # one-hot key, one-hot value, "table entry" flag, constant 1


def make_batch(rng, batch, n):
    """Inputs ``(batch, n, FEATURES)``, targets ``(batch, n - TABLE)`` (value ids of the queries)."""
    keys = np.argsort(rng.random((batch, N_KEYS)), axis=1)[:, :TABLE]  # distinct keys per table
    values = rng.integers(0, N_VALUES, (batch, TABLE))
    x = np.zeros((batch, n, FEATURES), np.float32)
    rows = np.arange(batch)[:, None]
    slots = np.arange(TABLE)[None, :]
    x[rows, slots, keys] = 1.0
    x[rows, slots, N_KEYS + values] = 1.0
    x[:, :TABLE, -2] = 1.0
    x[:, :, -1] = 1.0
    ask = rng.integers(0, TABLE, (batch, n - TABLE))  # which entry each query asks for
    x[rows, TABLE + np.arange(n - TABLE)[None, :], np.take_along_axis(keys, ask, 1)] = 1.0
    return x, np.take_along_axis(values, ask, 1)


def init_params(rng, d):
    s = 1.0 / np.sqrt(FEATURES)
    return {
        "wq": (rng.standard_normal((FEATURES, d)) * s).astype(np.float32),
        "wk": (rng.standard_normal((FEATURES, d)) * s).astype(np.float32),
        "wv": (rng.standard_normal((FEATURES, d)) * s).astype(np.float32),
        "wo": (rng.standard_normal((d, N_VALUES)) / np.sqrt(d)).astype(np.float32),
        "bo": np.zeros(N_VALUES, np.float32),
    }


def loss_and_grads(params, x, target, pattern):
    """Mean cross-entropy over the query positions and its gradient with respect to every weight."""
    q = (x @ params["wq"])[:, None]  # (batch, heads=1, n, d)
    k = (x @ params["wk"])[:, None]
    v = (x @ params["wv"])[:, None]
    out, vjp = sa.autograd.attention_vjp(q, k, v, pattern)
    h = out[:, 0, TABLE:]  # the queries' outputs
    logits = h @ params["wo"] + params["bo"]
    logits -= logits.max(-1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(-1, keepdims=True)
    picked = np.take_along_axis(prob, target[..., None], -1)[..., 0]
    loss = float(-np.log(np.maximum(picked, 1e-30)).mean())
    acc = float((prob.argmax(-1) == target).mean())
    dlogits = prob
    np.put_along_axis(dlogits, target[..., None], picked[..., None] - 1.0, -1)
    dlogits /= target.size
    grads = {"wo": _outer_sum(h, dlogits), "bo": dlogits.sum((0, 1))}
    dout = np.zeros_like(out)
    dout[:, 0, TABLE:] = dlogits @ params["wo"].T
    dq, dk, dv = vjp(dout)
    for name, g in (("wq", dq), ("wk", dk), ("wv", dv)):
        grads[name] = _outer_sum(x, g[:, 0])
    return loss, acc, grads


def _outer_sum(a, b):
    """``sum_{batch, position} a[..., :, None] * b[..., None, :]`` as one matrix product."""
    return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])


class Adam:
    def __init__(self, params, lr=2e-2, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros_like(p) for k, p in params.items()}

    def step(self, params, grads):
        self.t += 1
        for k, g in grads.items():
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            mh = self.m[k] / (1 - self.b1**self.t)
            vh = self.v[k] / (1 - self.b2**self.t)
            params[k] -= (self.lr * mh / (np.sqrt(vh) + self.eps)).astype(params[k].dtype)


def train(n=4096, steps=100, batch=4, d=32, window=64, seed=0, log_every=10, sinks=True, lr=2e-2):
    """Train on fresh batches; return the loss of every step."""
    rng = np.random.default_rng(seed)
    pattern = sa.patterns.sliding_window(window)
    if sinks:
        pattern = sa.patterns.sinks(TABLE) | pattern
    params = init_params(rng, d)
    opt = Adam(params, lr=lr)
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        x, target = make_batch(rng, batch, n)
        loss, acc, grads = loss_and_grads(params, x, target, pattern)
        opt.step(params, grads)
        losses.append(loss)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss:.3f}  accuracy {acc:.2f}  "
                  f"({time.perf_counter() - t0:.1f} s)")
    return losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="sequence length")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--compare", action="store_true", help="also train a sliding-window-only model")
    args = ap.parse_args()
    print(f"chance level: loss {np.log(N_VALUES):.3f}, accuracy {1 / N_VALUES:.2f}")
    print(f"sinks({TABLE}) | sliding_window(64), n = {args.n}:")
    train(args.n, args.steps, args.batch)
    if args.compare:
        print(f"sliding_window(64) alone, n = {args.n}:")
        train(args.n, args.steps, args.batch, sinks=False)


if __name__ == "__main__":
    main()
