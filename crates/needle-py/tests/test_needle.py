"""The Python package against the library and the `needle` command: DataFrames in, numpy out,
the same answers as the CLI, and every error as a Python exception."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import polars as pl
import pytest

import needle
from conftest import SMALL, generated_log, needle_bin


def run_cli(*args, **kw):
    p = subprocess.run([needle_bin(), *map(str, args)], capture_output=True, text=True, **kw)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_pandas_polars_and_arrow_give_the_same_dataset(log):
    df, items = log
    a = needle.Dataset.from_pandas(df, rating="rating", items=items, item_title="title")
    b = needle.Dataset.from_polars(pl.from_pandas(df), rating="rating", items=pl.from_pandas(items), item_title="title")
    c = needle.Dataset.from_arrow(pa.Table.from_pandas(df), rating="rating", items=pa.Table.from_pandas(items),
                                  item_title="title")
    for d in (a, b, c):
        assert (d.n_users, d.n_items, d.n_events) == (120, 90, 3600)
    assert a.fingerprint == b.fingerprint == c.fingerprint
    # String ids, a categorical column and datetimes read the same events.
    df2 = df.assign(user_id=df.user_id.astype(str).astype("category"),
                    timestamp=pd.to_datetime(df.timestamp, unit="s"))
    d = needle.Dataset.from_pandas(df2)
    assert d.n_events == 3600 and d.fingerprint == a.fingerprint


def test_a_dataframe_trains_like_the_same_log_from_a_file(log, tmp_path):
    df, _ = log
    df.to_csv(tmp_path / "log.csv", index=False)
    (tmp_path / "schema.toml").write_text(textwrap.dedent("""
        [interactions]
        path = "log.csv"
        header = true
        user = "user_id"
        item = "item_id"
        timestamp = "timestamp"
    """))
    cfg = json.loads(json.dumps(SMALL))
    run = needle.train(cfg, needle.Dataset.from_pandas(df), out=tmp_path / "py", quiet=True)
    toml = textwrap.dedent(f"""
        [data]
        schema = "{tmp_path / 'schema.toml'}"
        [model]
        kind = "youtubednn"
        dim = 16
        max_seq_len = 10
        user_features = []
        hidden = [32]
        [train]
        epochs = 2
        batch_size = 64
        threads = 2
        seed = 3
    """)
    (tmp_path / "cfg.toml").write_text(toml)
    run_cli("train", "--config", tmp_path / "cfg.toml", "--out", tmp_path / "cli", "--quiet")
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert cli == run.metrics
    again = run.evaluate(k=[10, 50, 100])
    assert {k: again[k] for k in again if "@" in k} == {k: v for k, v in cli.items() if "@" in k}


def test_recall_equals_the_cli_for_every_user(trained):
    ids, scores = trained.recall(k=10)
    assert ids.shape == scores.shape == (120, 10) and ids.dtype == np.int64 and scores.dtype == np.float32
    out = run_cli("recall", "--run", trained.path, "--users", "all", "--k", 10, "--scores")
    users = trained.user_ids
    lines = out.strip().split("\n")
    assert len(lines) == len(users)
    for i, line in enumerate(lines):
        user, ranked = line.split("\t")
        assert int(user) == users[i]
        pairs = [p.rsplit(":", 1) for p in ranked.split(",")]
        assert [int(p[0]) for p in pairs] == list(ids[i])
        assert np.allclose([float(p[1]) for p in pairs], scores[i], atol=1e-6)
    # By id, and by an explicit history.
    some, _ = trained.recall(users=[users[3], users[0]], k=10)
    assert (some == ids[[3, 0]]).all()
    h, hs = trained.recall(histories=[[100, 101, 102]], k=5)
    assert h.shape == (1, 5) and not set(h[0]) & {100, 101, 102}
    ex, _ = trained.recall(users=[users[0]], k=10, exclude=list(ids[0][:3]))
    assert list(ex[0][:7]) == list(ids[0][3:])
    only = list(ids[0][5:8])
    fl, _ = trained.recall(users=[users[0]], k=3, filter=only)
    assert list(fl[0]) == only


def test_vectors_are_bit_identical_to_needle_export(trained, tmp_path):
    run_cli("export", "--run", trained.path, "--out", tmp_path)
    ids, vecs = trained.item_vectors()
    exported = np.load(tmp_path / "item_embeddings.npy")
    assert vecs.dtype == np.float32 and vecs.tobytes() == exported.tobytes()
    tsv = (tmp_path / "items.tsv").read_text().split("\n")[1:-1]
    assert [int(l.split("\t")[1]) for l in tsv] == list(ids)
    uids, uvecs = trained.user_vectors()
    assert uvecs.tobytes() == np.load(tmp_path / "user_embeddings.npy").tobytes()
    assert list(uids) == list(trained.user_ids)
    sim, _ = trained.similar_items([ids[0]], k=5)
    assert sim.shape == (1, 5) and ids[0] not in sim[0]


def test_index_matches_needle_index(tmp_path):
    rng = np.random.default_rng(1)
    v = rng.standard_normal((2000, 24)).astype(np.float32)
    q = rng.standard_normal((50, 24)).astype(np.float32)
    np.save(tmp_path / "v.npy", v)
    truth = np.argsort(-(q @ v.T), axis=1, kind="stable")[:, :10]
    for kind in ["exact", "hnsw"]:
        run_cli("index", "build", "--vectors", tmp_path / "v.npy", "--kind", kind, "--out", tmp_path / f"{kind}.bin")
        cli = needle.Index.open(tmp_path / f"{kind}.bin")
        py = needle.Index.build(v, kind=kind)
        assert cli.spec == py.spec and len(cli) == len(py) == 2000
        a, sa = cli.search(q, 10)
        b, sb = py.search(q, 10)
        for ids in (a, b):
            hits = np.mean([len(set(ids[i]) & set(truth[i])) / 10 for i in range(len(q))])
            assert hits >= (1.0 if kind == "exact" else 0.95), (kind, hits)
        py.save(tmp_path / f"{kind}-py.bin")
        c, sc = needle.Index.open(tmp_path / f"{kind}-py.bin").search(q, 10)
        assert (c == b).all() and (sc == sb).all()
        if kind == "exact":
            # Exact search is deterministic: the same file, the same answers.
            assert (a == b).all() and (sa == sb).all()
            assert (tmp_path / "exact-py.bin").read_bytes() == (tmp_path / "exact.bin").read_bytes()
    exact = needle.Index.build(v, ids=np.arange(2000) * 3, kind="exact")
    ids, scores = exact.search(q, 5)
    truth = np.argsort(-(q @ v.T), axis=1, kind="stable")[:, :5] * 3
    assert (ids == truth).all()
    allowed = np.arange(0, 6000, 6)
    f, _ = exact.search(q, 5, filter=allowed)
    assert np.isin(f, allowed).all()


def test_errors_are_python_exceptions(log, trained, tmp_path):
    df, _ = log
    with pytest.raises(needle.DataError, match=r"column 'usr' not found \(columns: user_id, item_id, rating, timestamp\)"):
        needle.Dataset.from_pandas(df, user="usr")
    with pytest.raises(ValueError):
        needle.Dataset.from_pandas(df, time="when")
    with pytest.raises(needle.DataError, match="null id"):
        needle.Dataset.from_pandas(df.assign(item_id=df.item_id.astype(object).where(df.index != 5, None)))
    lenient = needle.Dataset.from_pandas(df.assign(item_id=df.item_id.astype("Int64").where(df.index != 5)),
                                         skip_bad_rows=True)
    assert lenient.skipped_rows == 1 and lenient.n_events == 3599
    with pytest.raises(needle.InvalidArgument):
        needle.Dataset.from_pandas([1, 2, 3])
    with pytest.raises(needle.DataError, match="no usable rows"):
        needle.Dataset.from_pandas(df.iloc[:0])
    with pytest.raises(needle.DataError, match="expected integers, timestamps or strings of digits"):
        needle.Dataset.from_pandas(df.assign(timestamp=df.timestamp + 0.5))
    with pytest.raises(needle.DataError, match=r"items: column 'title' not found"):
        needle.Dataset.from_pandas(df, items=log[1].drop(columns="title"), item_title="title")
    with pytest.raises(needle.ConfigError, match="unknown field"):
        needle.train({"model": {"kind": "youtubednn", "dimm": 3}}, needle.Dataset.from_pandas(df), out=tmp_path / "x")
    with pytest.raises(needle.ConfigError, match="user_features"):
        needle.train({"model": {"kind": "youtubednn"}}, needle.Dataset.from_pandas(df), out=tmp_path / "y", quiet=True)
    with pytest.raises(needle.FileError, match="already holds a run"):
        needle.train(SMALL, needle.Dataset.from_pandas(df), out=trained.path)
    with pytest.raises(needle.InvalidArgument, match="unknown user id `999999`"):
        trained.recall(users=[999999])
    with pytest.raises(needle.InvalidArgument, match="unknown item id"):
        trained.similar_items(["nope"])
    with pytest.raises(needle.RunError, match="not a run directory"):
        needle.Run.open(tmp_path)
    with pytest.raises(needle.VectorIndexError, match="unknown parameter"):
        needle.Index.build(np.zeros((4, 2), np.float32), kind="hnsw", mm=3)
    with pytest.raises(needle.InvalidArgument, match="dimensions"):
        needle.Index.build(np.ones((4, 2), np.float32), kind="exact").search(np.ones((1, 3), np.float32))
    with pytest.raises(needle.InvalidArgument, match="split"):
        trained.evaluate(split="train")
    with pytest.raises(needle.ConfigError, match="cannot read config"):
        needle.train(str(tmp_path / "missing.toml"), out=tmp_path / "z")


def test_default_config_and_repr(log, tmp_path):
    df, _ = log
    run = needle.train(data=needle.Dataset.from_pandas(df), out=tmp_path / "auto", quiet=True)
    assert run.kind == "sequential" and run.config["model"]["max_seq_len"] == 50
    assert needle.default_config(10**6)["model"]["max_seq_len"] == 200
    r = repr(run)
    assert r.startswith("Run(sequential on dataframe: 120 users, 90 items, dim 128; test HR@10 ")
    again = needle.Run.open(tmp_path / "auto")
    a, _ = again.recall(k=5)
    b, _ = run.recall(k=5)
    assert (a == b).all()


def test_ctrl_c_stops_training_and_keeps_the_best_epoch(tmp_path):
    df, _ = generated_log(n_users=400, per_user=60)
    df.to_parquet(tmp_path / "log.parquet")
    cfg = json.loads(json.dumps(SMALL))
    cfg["train"]["epochs"] = 500
    script = textwrap.dedent(f"""
        import json, pandas as pd, needle
        data = needle.Dataset.from_pandas(pd.read_parquet({str(tmp_path / 'log.parquet')!r}))
        run = needle.train(json.loads({json.dumps(json.dumps(cfg))}), data, out={str(tmp_path / 'run')!r})
        print("stopped", run.stopped, 0 <= run.metrics["hit_rate@10"] <= 1)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = p.stderr.readline()
        if line.startswith("epoch   2"):
            break
        assert line or p.poll() is None, "training ended before its second epoch"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert out.strip() == "stopped True True", (out, err)
    run = needle.Run.open(tmp_path / "run")
    assert run.config["train"]["epochs"] == 500
    training = run.training
    assert 2 <= training["epochs_run"] < 500 and 1 <= training["best_epoch"] <= training["epochs_run"]


def test_tune_searches_and_saves_the_winner(log, tmp_path):
    df, _ = log
    cfg = json.loads(json.dumps(SMALL))
    cfg["train"]["epochs"] = 3
    cfg["tune"] = {"metric": "ndcg@10", "train": {"lr": [0.001, 0.01]}}
    run = needle.tune(cfg, needle.Dataset.from_pandas(df), out=tmp_path / "t", budget="2m", trials=2, quiet=True)
    board = (tmp_path / "t" / "tune.md").read_text()
    rows = [l for l in board.splitlines() if l.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and "train.lr = " in board, board
    # The winner's config is the trial ranked first, without the search space.
    first = rows[0].split(" | ")[2]
    if first.startswith("train.lr = "):
        assert run.config["train"]["lr"] == float(first.split(" = ")[1])
    assert run.config.get("tune") is None and run.config["train"]["epochs"] == int(rows[0].split(" | ")[4])
    assert 0 <= run.metrics["hit_rate@10"] <= 1
    lines = (tmp_path / "t" / "tune.jsonl").read_text().splitlines()
    assert len(lines) >= 2 and json.loads(lines[0])
    # One TensorBoard run per trial, its validation curve as in the log.
    from tbparse import SummaryReader

    epochs = [json.loads(l) for l in lines if '"trial"' in l]
    for trial in {e["trial"] for e in epochs}:
        s = SummaryReader(str(tmp_path / "t" / "tb" / f"trial-{trial}")).scalars
        got = s[s.tag == "valid/ndcg@10"].value.tolist()
        assert got == pytest.approx([e["valid_ndcg10"] for e in epochs if e["trial"] == trial], rel=1e-6)
        if trial > 0:
            hp = SummaryReader(str(tmp_path / "t" / "tb" / f"trial-{trial}")).hparams
            assert dict(zip(hp.tag, hp.value))["train.lr"] in (0.001, 0.01)
    with pytest.raises(needle.InvalidArgument, match="already holds a run"):
        needle.tune(cfg, needle.Dataset.from_pandas(df), out=tmp_path / "t", budget=60, quiet=True)
    with pytest.raises(needle.ConfigError, match=r"no \[tune\] section"):
        needle.tune(SMALL, needle.Dataset.from_pandas(df), out=tmp_path / "u", budget=60)
    with pytest.raises(needle.InvalidArgument, match="duration"):
        needle.tune(cfg, needle.Dataset.from_pandas(df), out=tmp_path / "v", budget="soon")


def test_list_columns_are_multi_valued_features(log, tmp_path):
    df, items = log
    listed = items.assign(genres=items.genres.str.split("|"))
    cfg = json.loads(json.dumps(SMALL))
    cfg["model"]["item_features"] = ["genres"]
    a = needle.train(cfg, needle.Dataset.from_pandas(df, items=listed, item_title="title"), out=tmp_path / "l", quiet=True)
    b = needle.train(cfg, needle.Dataset.from_pandas(df, items=items, item_title="title", item_features={"genres": "|"}),
                     out=tmp_path / "s", quiet=True)
    # A list column and the same values joined by a separator are one feature.
    assert a.item_vectors()[1].tobytes() == b.item_vectors()[1].tobytes()
    with pytest.raises(needle.DataError, match="lists of strings or integers"):
        needle.Dataset.from_pandas(df, items=items.assign(genres=[[1.5]] * len(items)), item_title="title")


def test_training_writes_tensorboard_logs(trained, tmp_path):
    from tbparse import SummaryReader

    reader = SummaryReader(str(trained.path / "tb"))
    scalars = reader.scalars
    epochs = trained.training["epochs_run"]
    for tag in ["valid/hr@10", "valid/ndcg@10", "epoch/loss", "epoch/samples_per_sec", "epoch"]:
        assert (scalars.tag == tag).sum() == epochs, tag
    log = [json.loads(l) for l in (trained.path / "train_log.jsonl").read_text().splitlines()]
    ndcg = scalars[scalars.tag == "valid/ndcg@10"].value.tolist()
    assert ndcg == pytest.approx([r["valid_ndcg10"] for r in log], rel=1e-6)
    assert "kind = \"youtubednn\"" in reader.text.value.iloc[0]
    hp = dict(zip(reader.hparams.tag, reader.hparams.value))
    assert hp["model.kind"] == "youtubednn" and hp["train.epochs"] == 2 and hp["model.dim"] == 16
    df, _ = generated_log()
    run = needle.train(SMALL, needle.Dataset.from_pandas(df), out=tmp_path / "tb", quiet=True,
                       tensorboard=tmp_path / "logs", tensorboard_every=5)
    s = SummaryReader(str(tmp_path / "logs")).scalars
    loss = s[s.tag == "train/loss"]
    assert len(loss) >= 2 and (loss.step % 5 == 0).all() and (loss.value > 0).all()
    assert (s[s.tag == "train/lr"].value > 0).all()
