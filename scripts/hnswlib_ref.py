#!/usr/bin/env python3
"""hnswlib reference for `bench --mode engine`.

Reads data.npy, queries.npy and truth.npy (int64 row ids of the exact top k)
from --dir, builds an hnswlib index with the given M and ef_construction on
--threads threads, and for every --ef measures the QPS of the whole query
set (knn_query on --threads threads, repeated for at least 2 s) and its
recall@k. Prints one JSON object: {"version", "build_s", "curve": [...]}.
"""
import argparse
import json
import os
import time

import hnswlib
import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--space", choices=["l2", "ip", "cosine"], required=True)
    p.add_argument("--m", type=int, required=True)
    p.add_argument("--ef-construction", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--ef", required=True, help="comma-separated ef values")
    a = p.parse_args()

    data = np.load(os.path.join(a.dir, "data.npy"))
    queries = np.load(os.path.join(a.dir, "queries.npy"))
    truth = np.load(os.path.join(a.dir, "truth.npy"))[:, : a.k]

    index = hnswlib.Index(space=a.space, dim=data.shape[1])
    index.init_index(max_elements=data.shape[0], M=a.m, ef_construction=a.ef_construction, random_seed=100)
    index.set_num_threads(a.threads)
    t = time.perf_counter()
    index.add_items(data, np.arange(data.shape[0]), num_threads=a.threads)
    build_s = time.perf_counter() - t

    curve = []
    for ef in [int(e) for e in a.ef.split(",")]:
        index.set_ef(max(ef, a.k))
        done, t = 0, time.perf_counter()
        while True:
            labels, _ = index.knn_query(queries, k=a.k, num_threads=a.threads)
            done += len(queries)
            if time.perf_counter() - t >= 2.0:
                break
        qps = done / (time.perf_counter() - t)
        hits = sum(len(set(l.tolist()) & set(tr.tolist())) for l, tr in zip(labels, truth))
        curve.append({"ef": ef, "qps": qps, "recall": hits / (len(truth) * a.k)})
    print(json.dumps({"version": getattr(hnswlib, "__version__", "0.8"), "build_s": build_s, "curve": curve}))


if __name__ == "__main__":
    main()
