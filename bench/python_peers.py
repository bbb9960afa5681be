"""The same task in needle's Python API and in recall libraries from PyPI: train on MovieLens-1M,
then recall the top 100 items for every user; wall time, peak RSS, HR@10 and the lines of user
code each takes (results/python.md).

    bash bench/python_peers.sh DATA_DIR        # makes bench/.venv-peers, then runs every task

Protocol for every library: ratings.dat ordered by (user, time), stable; each user's newest event
is the test target, the one before it the validation target (needle's leave-last-out). The peers
train on everything but the test targets (they have no use for a validation split); needle trains
on the rest and selects its epoch on the validation targets, then reads them as history. HR@10 is
over the full catalogue with every item the user has seen left out, over every user.

Each task runs in a process of its own (`python bench/python_peers.py task NAME DATA_DIR`), so
its peak RSS (ru_maxrss) is its own; the lines counted are those between the task's `# user code`
markers.
"""

import inspect
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def load(data_dir):
    r = pd.read_csv(Path(data_dir) / "ml-1m" / "ratings.dat", sep="::", engine="python",
                    names=["user_id", "item_id", "rating", "timestamp"])
    return r


def split(r):
    """(train+valid events, test item per user), by needle's leave-last-out."""
    s = r.sort_values(["user_id", "timestamp"], kind="stable")
    last = s.groupby("user_id").tail(1)
    rest = s.drop(last.index)
    return rest, dict(zip(last.user_id, last.item_id))


def hr_at_10(users, top, test):
    """`top[i]` are user `users[i]`'s ranked item ids."""
    return float(np.mean([test[u] in set(top[i][:10]) for i, u in enumerate(users)]))


def needle_task(data_dir, r):
    # user code
    import needle
    data = needle.Dataset.from_pandas(r, rating="rating")
    run = needle.train("configs/ml-1m/sequential.toml", data, out="/tmp/peers-needle", force=True, quiet=True)
    ids, scores = run.recall(k=100)
    # user code
    _, test = split(r)
    return hr_at_10(list(run.user_ids), ids, test)


def implicit_als_task(data_dir, r):
    train, test = split(r)
    # user code
    import scipy.sparse as sp
    from implicit.als import AlternatingLeastSquares
    users, items = np.unique(train.user_id), np.unique(train.item_id)
    u = np.searchsorted(users, train.user_id)
    i = np.searchsorted(items, train.item_id)
    m = sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(len(users), len(items)))
    model = AlternatingLeastSquares(factors=64, iterations=15, regularization=0.05, random_state=42)
    model.fit(m, show_progress=False)
    top, _ = model.recommend(np.arange(len(users)), m, N=100, filter_already_liked_items=True)
    ids = items[top]
    # user code
    return hr_at_10(list(users), ids, test)


def implicit_bpr_task(data_dir, r):
    train, test = split(r)
    # user code
    import scipy.sparse as sp
    from implicit.bpr import BayesianPersonalizedRanking
    users, items = np.unique(train.user_id), np.unique(train.item_id)
    u = np.searchsorted(users, train.user_id)
    i = np.searchsorted(items, train.item_id)
    m = sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(len(users), len(items)))
    model = BayesianPersonalizedRanking(factors=64, iterations=100, random_state=42)
    model.fit(m, show_progress=False)
    top, _ = model.recommend(np.arange(len(users)), m, N=100, filter_already_liked_items=True)
    ids = items[top]
    # user code
    return hr_at_10(list(users), ids, test)


def lightfm_task(data_dir, r):
    train, test = split(r)
    # user code
    import scipy.sparse as sp
    from lightfm import LightFM
    users, items = np.unique(train.user_id), np.unique(train.item_id)
    u = np.searchsorted(users, train.user_id)
    i = np.searchsorted(items, train.item_id)
    m = sp.coo_matrix((np.ones(len(u), np.float32), (u, i)), shape=(len(users), len(items)))
    model = LightFM(no_components=64, loss="warp", random_state=42)
    model.fit(m, epochs=30, num_threads=2)
    ub, uv = model.get_user_representations()
    ib, iv = model.get_item_representations()
    scores = uv @ iv.T + ib[None, :]
    seen = m.tocsr()
    scores[seen.nonzero()] = -np.inf
    ids = items[np.argsort(-scores, axis=1)[:, :100]]
    # user code
    return hr_at_10(list(users), ids, test)


# The example's learning rate; `TORCH_RECHUB_LR=0.001 ...` tries another.
LR = float(os.environ.get("TORCH_RECHUB_LR", "1e-4"))


def torch_rechub_task(data_dir, r):
    train, test = split(r)
    # user code
    import torch
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.matching import YoutubeDNN
    from torch_rechub.trainers import MatchTrainer
    from torch_rechub.utils.data import MatchDataGenerator, df_to_dict, pad_sequences
    from torch_rechub.utils.match import gen_model_input, generate_seq_feature_match
    torch.manual_seed(42)
    os.makedirs("/tmp/peers-rechub", exist_ok=True)
    df = train[["user_id", "item_id", "timestamp"]].copy()
    users, items = np.unique(df.user_id), np.unique(df.item_id)
    df["user_id"] = np.searchsorted(users, df.user_id) + 1
    df["item_id"] = np.searchsorted(items, df.item_id) + 1
    user_profile, item_profile = df[["user_id"]].drop_duplicates(), df[["item_id"]].drop_duplicates()
    samples, _ = generate_seq_feature_match(df.copy(), "user_id", "item_id", time_col="timestamp",
                                            item_attribute_cols=[], sample_method=1, mode=2, neg_ratio=3)
    x = gen_model_input(samples, user_profile, "user_id", item_profile, "item_id", seq_max_len=50)
    n_u, n_i = len(users) + 1, len(items) + 1
    user_features = [SparseFeature("user_id", vocab_size=n_u, embed_dim=16),
                     SequenceFeature("hist_item_id", vocab_size=n_i, embed_dim=16, pooling="mean", shared_with="item_id")]
    item_features = [SparseFeature("item_id", vocab_size=n_i, embed_dim=16)]
    neg = [SequenceFeature("neg_items", vocab_size=n_i, embed_dim=16, pooling="concat", shared_with="item_id")]
    model = YoutubeDNN(user_features, item_features, neg, user_params={"dims": [128, 64, 16]}, temperature=0.02)
    trainer = MatchTrainer(model, mode=2, optimizer_params={"lr": LR, "weight_decay": 1e-6}, n_epoch=10,
                           device="cpu", model_path="/tmp/peers-rechub")
    loader = MatchDataGenerator(x=x, y=np.zeros(len(samples))).generate_dataloader(
        x, df_to_dict(item_profile), batch_size=2048, num_workers=0)[0]
    trainer.fit(loader)
    hist = df.sort_values(["user_id", "timestamp"], kind="stable").groupby("user_id").item_id.apply(list)
    model.eval()
    with torch.no_grad():
        model.mode = "user"
        uv = model({"user_id": torch.tensor(hist.index.values),
                    "hist_item_id": torch.tensor(pad_sequences(hist.tolist(), maxlen=50, value=0))}).numpy()
        model.mode = "item"
        iv = model({"item_id": torch.arange(1, n_i)}).numpy()
    scores = uv @ iv.T
    for row, h in enumerate(hist):
        scores[row, np.array(h) - 1] = -np.inf
    ids = items[np.argsort(-scores, axis=1)[:, :100]]
    # user code
    return hr_at_10(list(users[hist.index.values - 1]), ids, test)


TASKS = {
    "needle": (needle_task, "needle sequential.toml (Python API)"),
    "implicit-als": (implicit_als_task, "implicit ALS, 64 factors, 15 iterations"),
    "implicit-bpr": (implicit_bpr_task, "implicit BPR, 64 factors, 100 iterations"),
    "lightfm": (lightfm_task, "LightFM WARP, 64 components, 30 epochs"),
    "torch-rechub": (torch_rechub_task, f"torch-rechub YoutubeDNN as in its ML-1M example (dims 128-64-16, 10 epochs, lr {LR:g})"),
}


def user_lines(fn):
    src = inspect.getsource(fn).split("# user code")[1]
    return sum(1 for l in src.splitlines() if l.strip() and not l.strip().startswith("#"))


def task(name, data_dir):
    r = load(data_dir)
    fn = TASKS[name][0]
    t = time.perf_counter()
    hr = fn(data_dir, r)
    secs = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": secs, "peak_rss_mb": rss, "hr10": hr, "lines": user_lines(fn)}))


def main():
    if sys.argv[1] == "task":
        return task(sys.argv[2], sys.argv[3])
    data_dir = sys.argv[1]
    names = sys.argv[2:] or list(TASKS)
    print("| library | what | lines of user code | wall s (train + recall) | peak RSS MB | HR@10 |")
    print("|---|---|---|---|---|---|")
    for name in names:
        p = subprocess.run([sys.executable, __file__, "task", name, data_dir], capture_output=True, text=True)
        if p.returncode != 0:
            print(f"| {name} | {TASKS[name][1]} | failed: {p.stderr.strip().splitlines()[-1:]} | | | |")
            continue
        m = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"| {name} | {TASKS[name][1]} | {m['lines']} | {m['seconds']:.1f} | {m['peak_rss_mb']:.0f} | {m['hr10']:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
