#!/usr/bin/env python3
"""Training throughput of a PyTorch SASRec of the same shape as needle's sequential model.

Reads MovieLens-1M (ratings.dat), orders each user's events as needle does (stable sort by
timestamp, file order on ties), holds out the last two events (validation and test), and cuts the
rest into windows of at most --max-len targets, the newest ending at the user's last training
event, exactly as `needle train` does for `kind = "sequential"`. The model: item embeddings tied
with the output side, learned positions, --blocks pre-norm causal self-attention blocks
(--heads heads, feed-forward width --ffn, dropout --dropout), final layer norm, L2-normalised
user and item vectors over a temperature, full softmax cross-entropy at every position; Adam.

It times --steps optimizer steps after 3 warm-up steps on --threads threads and prints one
markdown row: median step, targets (positions) per second over the timed steps.

    python3 bench/sasrec_reference.py --data ../shared/data/ml-1m

The first run creates bench/.venv-torch and installs numpy and torch from PyPI into it.
"""

import argparse
import os
import sys
import time

from pyvenv import ensure_venv

PACKAGES = ["numpy", "torch"]


def windows(path, max_len):
    """Training windows `(inputs, targets)` as lists of item rows (1-based; 0 is padding)."""
    events = {}
    with open(os.path.join(path, "ratings.dat"), encoding="latin-1") as f:
        for line in f:
            user, item, _, ts = line.rstrip("\n").split("::")
            events.setdefault(user, []).append((int(ts), item))
    seqs = []
    for evs in events.values():
        evs.sort(key=lambda e: e[0])  # stable: file order on ties
        seqs.append([item for _, item in evs[:-2]])
    vocab = {}
    for s in seqs:
        for item in s:
            vocab.setdefault(item, len(vocab) + 1)
    out = []
    for s in seqs:
        rows = [vocab[i] for i in s]
        pos = len(rows) - 1
        while pos >= 1:
            n = min(pos, max_len)
            out.append((rows[pos - n:pos], rows[pos - n + 1:pos + 1]))
            pos -= max_len
    return out, len(vocab) + 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = os.path.join(os.environ.get("NEEDLE_DATA_DIR", "data"), "ml-1m")
    ap.add_argument("--data", default=default_data, help="the ml-1m directory (ratings.dat)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--ffn", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32, help="windows per step")
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.data, "ratings.dat")):
        sys.exit(f"{args.data}/ratings.dat not found: pass --data or set NEEDLE_DATA_DIR")
    ensure_venv(".venv-torch", PACKAGES, "torch is a large download", __file__)

    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wins, n_items = windows(args.data, args.max_len)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(wins))

    class Block(torch.nn.Module):
        def __init__(self, d, heads, ffn, p):
            super().__init__()
            self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.qkv, self.out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
            self.ff1, self.ff2 = torch.nn.Linear(d, ffn), torch.nn.Linear(ffn, d)
            self.heads, self.p = heads, p

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
            shape = (b, t, self.heads, d // self.heads)
            q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + F.dropout(self.out(a), self.p, self.training)
            return x + F.dropout(self.ff2(F.relu(self.ff1(self.ln2(x)))), self.p, self.training)

    class SASRec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            d = args.dim
            self.items = torch.nn.Embedding(n_items, d, padding_idx=0)
            self.pos = torch.nn.Embedding(args.max_len, d)
            self.blocks = torch.nn.ModuleList(
                Block(d, args.heads, args.ffn, args.dropout) for _ in range(args.blocks))
            self.ln = torch.nn.LayerNorm(d)

        def forward(self, ids):
            t = ids.shape[1]
            x = self.items(ids) + self.pos(torch.arange(t))
            x = F.dropout(x, args.dropout, self.training)
            for blk in self.blocks:
                x = blk(x)
            return F.normalize(self.ln(x), dim=-1)

    model = SASRec()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def batch(i):
        sel = [wins[j] for j in order[(i * args.batch) % len(order):][:args.batch]]
        t = max(len(w[0]) for w in sel)
        # Left-aligned windows: with a causal mask, padding after a window never reaches it.
        ids = torch.zeros(len(sel), t, dtype=torch.long)
        tgt = torch.zeros(len(sel), t, dtype=torch.long)
        for r, (inp, out) in enumerate(sel):
            ids[r, :len(inp)] = torch.tensor(inp)
            tgt[r, :len(out)] = torch.tensor(out)
        return ids, tgt

    def step(ids, tgt):
        h = model(ids)
        mask = tgt > 0
        logits = h[mask] @ F.normalize(model.items.weight, dim=-1).T / args.temperature
        loss = F.cross_entropy(logits, tgt[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return int(mask.sum())

    model.train()
    times, targets = [], 0
    for i in range(args.steps + 3):
        ids, tgt = batch(i)
        t0 = time.perf_counter()
        n = step(ids, tgt)
        if i >= 3:
            times.append((time.perf_counter() - t0) / n)
            targets += n
    times.sort()
    per_target = times[len(times) // 2]
    mean_batch = targets / args.steps
    print("| program | shape | median step ms (mean batch) | targets/s |")
    print("|---|---|---|---|")
    print(f"| PyTorch {torch.__version__} SASRec, {args.threads} threads | d {args.dim}, {args.blocks} blocks, "
          f"{args.heads} heads, ffn {args.ffn}, len {args.max_len}, {args.batch} windows/step, "
          f"{n_items - 1} items, full softmax | {per_target * mean_batch * 1e3:.1f} | {1.0 / per_target:.0f} |")


if __name__ == "__main__":
    main()
