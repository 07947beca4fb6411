"""Near-duplicate benchmark: this project's MinHash stage vs datasketch, on the same rows.

    python bench/dedup.py                       # 100,000 prompts, 3 seeds (about 3 minutes on 2 cores)
    python bench/dedup.py --rows 20000          # quicker

What it does:
1. Generates N synthetic prompts (Zipf-distributed pseudo-words, 8-40 words each); 15% of
   the distinct prompts are template siblings of the one before (60-85% of the words
   shared, a different ending: hard negatives, as in templated prompt sets). About
   12% of the distinct prompts get 1-4 planted near-duplicates (word substitutions,
   deletions, insertions, adjacent swaps, a clause moved to the front, case and
   punctuation changes); rows are shuffled. The planted cluster of every row is the
   ground truth.
2. Runs both sides over the same N rows, each in its own process (so peak RSS is its own),
   timed from the prompts in memory to one kept-row index per row:
   - ours: `tasks.filters.minhash.near_duplicates` at the `near_dedup` defaults (normalise,
     shingle, signatures, LSH, verification by the true Jaccard of the candidates' shingle
     sets, clusters), and once more with `verify: estimate`;
   - datasketch configured alike: the same shingles (character 5-grams of the same
     normalised text), `MinHash` (scheme affine32, xxh32 as the shingle hash when the
     xxhash package is there, else datasketch's SHA-1), `MinHashLSH` with the same bands
     x rows as ours (`params=(b, r)`); each row queries the rows before it, every
     candidate is verified by the estimated Jaccard of the two MinHashes (kept when ≥ the
     threshold), then the row is inserted; the verified pairs go through the same cluster
     resolution as ours (`tasks.filters.dedup.resolve_clusters`). Once more with the candidates
     verified by the true Jaccard of their shingle sets, written around datasketch in
     Python (it has no such option), so both verifications are compared on both sides.
   Both run once per MinHash seed (--seeds, default 3: the hash functions are random, and
   F1 moves by a few thousandths from one seed to the next), ours also once more at the
   end; the slowest run of ours and the fastest of datasketch set the speed ratio, and
   F1 is compared as the mean over the seeds.
3. Optionally (--stream) `tasks.filters.dataset.filter_dataset` over Parquet shards of the
   same rows (exact + near dedup, reading and writing), for the streaming stage's rate.
4. Prints rows/s, peak RSS, precision/recall/F1 of both and the speed ratio, and per seed
   each side's MinHash estimate against the true Jaccard of 2,000 planted pairs (bias, RMS
   error, share of pairs at or above the threshold that verification keeps), which tells an
   F1 gap of the method from the luck of one draw of permutations.
   Target: ours ≥ 10x datasketch's rows/s at equal or better F1.

Scoring: a row predicted as a duplicate is a true positive when it belongs to a planted
cluster and the row it was matched to is in the same cluster. Recall divides by the
planted duplicates (cluster size - 1 per cluster). "attainable" is the share of planted
pairs (variant, original) whose true Jaccard similarity reaches the threshold.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PUNCTUATION = ["?", ".", "!", ":", ","]


# ------------------------------------------------------------------------------ corpus


def make_vocabulary(rng: np.random.Generator, size: int = 40_000) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 11, size=size)
    flat = letters[rng.integers(0, 26, size=int(lengths.sum()))]
    words, start = [], 0
    for length in lengths:
        words.append("".join(flat[start : start + length]))
        start += length
    return words


def mutate(words: list[str], rng: random.Random, vocabulary: list[str]) -> list[str]:
    """One or two light edits of a word list (a planted near-duplicate)."""
    words = list(words)
    for _ in range(rng.choice((1, 1, 2))):
        op = rng.randrange(7)
        i = rng.randrange(len(words))
        if op == 0:
            words[i] = rng.choice(vocabulary)  # substitution
        elif op == 1 and len(words) > 4:
            del words[i]  # deletion
        elif op == 2:
            words.insert(i, rng.choice(vocabulary))  # insertion
        elif op == 3 and i + 1 < len(words):
            words[i], words[i + 1] = words[i + 1], words[i]  # adjacent swap
        elif op == 4 and len(words) >= 8:
            cut = rng.randrange(len(words) * 2 // 3, len(words))  # move the last clause to the front
            words = words[cut:] + words[:cut]
        elif op == 5:
            words[i] = words[i].upper()  # case
        else:
            words[i] = words[i] + rng.choice(PUNCTUATION)  # punctuation
    return words


def make_corpus(rows: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """(prompts, cluster id per prompt); cluster id = index of the original prompt."""
    np_rng, rng = np.random.default_rng(seed), random.Random(seed)
    vocabulary = make_vocabulary(np_rng)
    ranks = np.minimum(np_rng.zipf(1.15, size=rows * 30), len(vocabulary)) - 1
    position = 0
    texts: list[str] = []
    cluster: list[int] = []
    previous: list[str] = []
    while len(texts) < rows:
        length = rng.randint(8, 40)
        words = [vocabulary[r] for r in ranks[position : position + length]]
        position = (position + length) % (len(ranks) - 64)
        words[0] = words[0].capitalize()
        if texts and rng.random() < 0.15 and len(previous) >= 10:
            # a template sibling: a distinct prompt sharing 60-85% of the previous one's
            # words (a hard negative, e.g. the same instruction about a different object)
            keep = int(len(previous) * rng.uniform(0.6, 0.85))
            words = previous[:keep] + [vocabulary[r] for r in ranks[position : position + len(previous) - keep]]
        previous = words
        original = len(texts)
        texts.append(" ".join(words) + rng.choice("?.!"))
        cluster.append(original)
        if rng.random() < 0.12:
            for _ in range(min(rng.randint(1, 4), rows - len(texts))):
                texts.append(" ".join(mutate(words, rng, vocabulary)) + rng.choice("?.!"))
                cluster.append(original)
    order = np_rng.permutation(len(texts))[:rows]
    return [texts[i] for i in order], np.asarray(cluster, dtype=np.int64)[order]


def write_dataset(texts: list[str], directory: Path, rows_per_shard: int = 100_000) -> None:
    import pyarrow as pa

    from distillflow.records import content_id
    from distillflow.storage.manifest import write_manifest
    from distillflow.storage.parquet import write_table_atomic

    for shard, start in enumerate(range(0, len(texts), rows_per_shard)):
        chunk = texts[start : start + rows_per_shard]
        # ids: content hash plus row number (planted exact copies must stay distinct rows)
        table = pa.table(
            {
                "id": [content_id(text)[:24] + f"{start + i:08x}" for i, text in enumerate(chunk)],
                "prompt": chunk,
                "strategy": ["seed"] * len(chunk),
            }
        )
        write_table_atomic(table, directory / "data" / f"part-{shard:05d}.parquet")
    write_manifest(directory, {"name": "bench-dedup", "config": {}})


# ------------------------------------------------------------------------------ scoring


def score(duplicate_of: np.ndarray, cluster: np.ndarray) -> dict[str, float]:
    """Precision/recall/F1 of predicted duplicates (duplicate_of != -1) against planted clusters."""
    sizes = np.bincount(np.unique(cluster, return_inverse=True)[1])
    truth = int((sizes - 1).sum())
    predicted = np.flatnonzero(duplicate_of >= 0)
    correct = int((cluster[predicted] == cluster[duplicate_of[predicted]]).sum())
    precision = correct / len(predicted) if len(predicted) else 1.0
    recall = correct / truth if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "predicted": int(len(predicted)), "planted": truth}


def attainable(texts: list[str], cluster: np.ndarray, threshold: float, ngram: int, limit: int = 20_000) -> float:
    """Share of planted (variant, first-of-cluster) pairs whose true shingle Jaccard ≥ threshold."""
    from distillflow.tasks.filters.minhash import near_dedup_normalize

    def shingles(text: str) -> set[str]:
        norm = near_dedup_normalize(text)
        return {norm[i : i + ngram] for i in range(max(1, len(norm) - ngram + 1))}

    first: dict[int, int] = {}
    hits = total = 0
    for row, c in enumerate(cluster.tolist()):
        if c not in first:
            first[c] = row
            continue
        a, b = shingles(texts[row]), shingles(texts[first[c]])
        hits += len(a & b) / len(a | b) >= threshold
        total += 1
        if total >= limit:
            break
    return hits / total if total else 1.0


def estimator_error(texts: list[str], cluster: np.ndarray, args: dict, seed: int, limit: int = 2_000) -> dict:
    """Estimated vs true shingle Jaccard of planted (variant, first-of-cluster) pairs, both sides.

    Returns the mean error (bias), its RMS, and the share of pairs with true Jaccard ≥ the
    threshold whose estimate also reaches it (what verification keeps)."""
    from datasketch import MinHash

    from distillflow.tasks.filters.config import NearDedupConfig
    from distillflow.tasks.filters.minhash import near_dedup_normalize, signatures

    ngram, threshold = args["ngram"], args["threshold"]
    first: dict[int, int] = {}
    pairs = []
    for row, c in enumerate(cluster.tolist()):
        if c in first:
            pairs.append((first[c], row))
        else:
            first[c] = row
        if len(pairs) >= limit:
            break

    def shingles(text: str) -> list[bytes]:
        norm = near_dedup_normalize(text).encode("utf-8")
        return [norm[i : i + ngram] for i in range(max(1, len(norm) - ngram + 1))]

    true = np.array([len(set(shingles(texts[a])) & set(shingles(texts[b])))
                     / len(set(shingles(texts[a])) | set(shingles(texts[b]))) for a, b in pairs])
    rows = sorted({row for pair in pairs for row in pair})
    position = {row: i for i, row in enumerate(rows)}
    signature = signatures([texts[row] for row in rows], NearDedupConfig(num_perm=args["num_perm"], seed=seed))
    ours = np.array([(signature[position[a]] == signature[position[b]]).mean() for a, b in pairs])
    try:  # the same shingle hash as `run_datasketch`
        from xxhash import xxh32_intdigest as hashfunc
    except ImportError:
        hashfunc = None
    template = MinHash(num_perm=args["num_perm"], seed=seed, scheme="affine32",
                       **({"hashfunc": hashfunc} if hashfunc else {}))
    minhashes = {}
    for row in rows:
        minhashes[row] = template.copy()
        minhashes[row].update_batch(shingles(texts[row]))
    theirs = np.array([minhashes[a].jaccard(minhashes[b]) for a, b in pairs])
    above = true >= threshold
    return {name: {"bias": float(np.mean(est - true)), "rms": float(np.sqrt(np.mean((est - true) ** 2))),
                   "kept": float(np.mean(est[above] >= threshold))}
            for name, est in (("ours", ours), ("datasketch", theirs))}


# ------------------------------------------------------------------------------ runners (child processes)


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would include the parent's at spawn)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(texts_path: str, args: dict, out: mp.Queue) -> None:
    from distillflow.tasks.filters.config import NearDedupConfig
    from distillflow.tasks.filters.minhash import banding, near_duplicates

    texts = json.loads(Path(texts_path).read_text())
    config = NearDedupConfig(threshold=args["threshold"], num_perm=args["num_perm"], unit="char", ngram=args["ngram"],
                             seed=args["seed"], verify=args.get("verify", "exact"))
    near_duplicates(texts[:1000], config)  # load the compiled kernels (numba's on-disk cache)
    started = time.perf_counter()
    result = near_duplicates(texts, config)
    elapsed = time.perf_counter() - started
    out.put({"elapsed": elapsed, "duplicate_of": result.duplicate_of.tolist(), "rss_mb": peak_rss_mb(),
             "candidates": result.candidate_pairs, "verified": result.verified_pairs, "banding": banding(config)})


def run_stream(in_dir: str, out_dir: str, args: dict, out: mp.Queue) -> None:
    from distillflow.tasks.filters.dataset import filter_dataset
    from distillflow.tasks.filters.config import FiltersConfig
    from distillflow.tasks.filters.minhash import signatures

    config = FiltersConfig(near_dedup={"threshold": args["threshold"], "num_perm": args["num_perm"], "ngram": args["ngram"]})
    signatures(["warm up the compiled kernel"], config.near_dedup)
    started = time.perf_counter()
    manifest = filter_dataset(in_dir, out_dir, config)
    out.put({"elapsed": time.perf_counter() - started, "rss_mb": peak_rss_mb(), "counts": manifest["counts"],
             "reasons": manifest["filter_reject_reasons"]})


def run_datasketch(texts_path: str, args: dict, out: mp.Queue) -> None:
    from datasketch import MinHash, MinHashLSH

    from distillflow.tasks.filters.dedup import resolve_clusters
    from distillflow.tasks.filters.minhash import near_dedup_normalize

    try:  # a fast shingle hash: datasketch's default is SHA-1 in Python
        from xxhash import xxh32_intdigest as hashfunc
    except ImportError:
        hashfunc = None
    texts = json.loads(Path(texts_path).read_text())
    num_perm, ngram, threshold = args["num_perm"], args["ngram"], args["threshold"]
    template = MinHash(num_perm=num_perm, seed=args["seed"], scheme="affine32",
                       **({"hashfunc": hashfunc} if hashfunc else {}))
    started = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=tuple(args["banding"]))
    minhashes = []
    left, right = [], []
    candidates_seen = 0
    exact = args.get("verify") == "exact"

    def shingles(text: str) -> set[bytes]:
        norm = near_dedup_normalize(text).encode("utf-8")
        return {norm[i : i + ngram] for i in range(max(1, len(norm) - ngram + 1))}

    for row, text in enumerate(texts):
        norm = near_dedup_normalize(text).encode("utf-8")
        minhash = template.copy()
        minhash.update_batch([norm[i : i + ngram] for i in range(max(1, len(norm) - ngram + 1))])
        mine = shingles(text) if exact else None
        for candidate in lsh.query(minhash):  # verification: Jaccard (estimated or exact) ≥ threshold
            candidates_seen += 1
            if exact:
                theirs = shingles(texts[candidate])
                similarity = len(mine & theirs) / len(mine | theirs)
            else:
                similarity = minhash.jaccard(minhashes[candidate])
            if similarity >= threshold:
                left.append(candidate)
                right.append(row)
        lsh.insert(row, minhash)
        minhashes.append(minhash)
    duplicate_of = resolve_clusters(len(texts), np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64))
    elapsed = time.perf_counter() - started
    out.put({"elapsed": elapsed, "duplicate_of": duplicate_of.tolist(), "rss_mb": peak_rss_mb(),
             "banding": (lsh.b, lsh.r), "candidates": candidates_seen, "verified": len(left),
             "hash": "xxh32" if hashfunc else "sha1"})


def in_child(target, *args) -> dict:  # noqa: ANN001
    queue: mp.Queue = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--ngram", type=int, default=5, help="character n-gram length")
    parser.add_argument("--workdir", type=Path, default=None, help="where shards go (default: a temp dir)")
    parser.add_argument("--seeds", type=int, default=3, help="MinHash seeds; F1 is compared as the mean over them")
    parser.add_argument("--stream", action="store_true", help="also time the streaming filter_dataset run")
    args = parser.parse_args()
    from provenance import provenance  # bench/provenance.py, beside this script
    print(provenance(), flush=True)
    settings = {"threshold": args.threshold, "num_perm": args.num_perm, "ngram": args.ngram}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    workdir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    texts, cluster = make_corpus(args.rows)
    (workdir / "texts.json").write_text(json.dumps(texts))
    if args.stream:
        write_dataset(texts, workdir / "in")
    print(f"corpus: {len(texts):,} prompts ({np.mean([len(t) for t in texts[:10000]]):.0f} chars on average), "
          f"{score(np.full(len(texts), -1), cluster)['planted']:,} planted near-duplicates; "
          f"built in {time.perf_counter() - t0:.0f}s → {workdir}")
    reach = attainable(texts, cluster, args.threshold, args.ngram)
    print(f"settings: char {args.ngram}-grams, threshold {args.threshold}, num_perm {args.num_perm}; "
          f"{reach:.1%} of planted pairs have true Jaccard ≥ threshold (attainable recall)")
    errors = [estimator_error(texts, cluster, settings, seed) for seed in range(1, args.seeds + 1)]
    del texts

    rows_out = []

    def report(name: str, result: dict, scores: dict | None) -> float:
        rate = args.rows / result["elapsed"]
        line = (f"{name:<36} {args.rows:>9,} rows {result['elapsed']:>8.2f}s {rate:>11,.0f} rows/s  "
                f"peak RSS {result['rss_mb']:>6,.0f} MB")
        if scores:
            line += f"  P {scores['precision']:.4f} R {scores['recall']:.4f} F1 {scores['f1']:.4f}"
        print(line, flush=True)
        rows_out.append({"name": name, "rows": args.rows, "rows_per_s": rate, **result, **(scores or {})})
        return rate

    texts_path = str(workdir / "texts.json")
    # One run of each side per MinHash seed (the permutations), alternating; ours once more at
    # the end, so that it runs both before and after every datasketch run. Each side verifies
    # its candidates both ways: by the estimated Jaccard (datasketch's `MinHash.jaccard`;
    # ours with `verify: estimate`) and by the true Jaccard of the two shingle sets (ours'
    # default `verify: exact`; for datasketch, written around it in Python).
    variants = ("exact", "estimate")
    ours_runs: dict[str, list[dict]] = {v: [] for v in variants}
    theirs_runs: dict[str, list[dict]] = {v: [] for v in variants}
    banding_of = None
    for seed in range(1, args.seeds + 1):
        for verify in variants:
            ours_runs[verify].append(in_child(run_ours, texts_path, settings | {"seed": seed, "verify": verify}))
            banding_of = banding_of or ours_runs[verify][0]["banding"]
            theirs_runs[verify].append(in_child(run_datasketch, texts_path,
                                                settings | {"seed": seed, "banding": banding_of, "verify": verify}))
    ours_runs["exact"].append(in_child(run_ours, texts_path, settings | {"seed": 1, "verify": "exact"}))
    for side in (ours_runs, theirs_runs):
        for runs in side.values():
            for run in runs:
                run["scores"] = score(np.asarray(run.pop("duplicate_of")), cluster)
    # speed: the slowest run of ours at its default (contention counts against us), the
    # fastest of datasketch in either variant
    ours = max(ours_runs["exact"], key=lambda r: r["elapsed"])
    theirs = min(theirs_runs["estimate"] + theirs_runs["exact"], key=lambda r: r["elapsed"])
    ours_rate = report("ours near_duplicates, verify exact (slowest)", ours, ours["scores"])
    report("ours near_duplicates, verify estimate (slowest)", max(ours_runs["estimate"], key=lambda r: r["elapsed"]),
           ours_runs["estimate"][0]["scores"])
    theirs_rate = report(f"datasketch MinHash+LSH+verify, {theirs['hash']} (fastest)", theirs, theirs["scores"])
    report("datasketch, verify exact (fastest)", min(theirs_runs["exact"], key=lambda r: r["elapsed"]),
           theirs_runs["exact"][0]["scores"])
    if args.stream:
        stream = in_child(run_stream, str(workdir / "in"), str(workdir / "out"), settings)
        report("ours filter_dataset (stream, Parquet)", stream, None)
        print(f"  streaming counts: {stream['counts']}  reasons: {stream['reasons']}")
    bands, rows = ours["banding"]
    print(f"LSH {bands} bands x {rows} rows on both sides; candidate pairs → verified (seed 1, exact): "
          f"ours {ours_runs['exact'][0]['candidates']:,} → {ours_runs['exact'][0]['verified']:,}, "
          f"datasketch {theirs_runs['exact'][0]['candidates']:,} → {theirs_runs['exact'][0]['verified']:,}")
    ratio = ours_rate / theirs_rate
    print(f"speed ratio ours (default, exact) / datasketch (fastest variant), same {args.rows:,} rows: {ratio:,.1f}x "
          f"(target ≥ 10x) {'OK' if ratio >= 10 else 'BELOW TARGET'}")
    f1 = {f"{name} {verify}": [run["scores"]["f1"] for run in runs[verify][: args.seeds]]
          for name, runs in (("ours", ours_runs), ("datasketch", theirs_runs)) for verify in variants}
    for name, values in f1.items():
        print(f"F1 {name:<20} per seed: " + ", ".join(f"{v:.4f}" for v in values) + f"   mean {np.mean(values):.4f}"
              f" ± {np.std(values, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0:.4f} (s.e.)")
    for name in ("ours", "datasketch"):
        print(f"MinHash estimate vs true Jaccard, {name:<10} (2,000 planted pairs, per seed): "
              + ", ".join(f"bias {e[name]['bias']:+.4f} RMS {e[name]['rms']:.4f} kept {e[name]['kept']:.3f}"
                          for e in errors))
    def standard_error(values: list[float]) -> float:
        return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0

    ours_f1 = f1["ours exact"]
    for variant, label in (("datasketch estimate", "datasketch as it comes (MinHash.jaccard)"),
                           ("datasketch exact", "datasketch with exact verification around it")):
        difference = float(np.mean(ours_f1) - np.mean(f1[variant]))
        noise = 2 * float(np.hypot(standard_error(ours_f1), standard_error(f1[variant])))
        verdict = "better" if difference > noise else "equal within seed noise" if difference >= -noise else "WORSE"
        print(f"F1, same rows, mean over {args.seeds} seed(s): ours (default) {np.mean(ours_f1):.4f} vs {label} "
              f"{np.mean(f1[variant]):.4f}: {difference:+.4f} (2 s.e. {noise:.4f}) → {verdict}")
    (workdir / "results.json").write_text(json.dumps(
        rows_out, indent=2, default=str))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
