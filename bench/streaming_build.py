"""Streaming build: peak memory against dataset size, fan-out against one process, per-stage rates.

A local OpenAI-compatible server (tests/openai_server.py, fixed latency, unlimited
capacity) answers; a real `prefect server start` records the runs. Every build is the
`distill build` CLI in its own process; its RSS is sampled (with its children: client
processes, Dask workers) every 0.1 s.

  (1) memory: `distill build` at --small and --large prompts (20k and 200k), same shard
      size (--shard-rows), same run. Target: peak RSS(large) <= 1.2 x peak RSS(small).
  (2) fan-out: --fanout-prompts (40k) on 2 workers against one process: `dataset.work_pool`
      (2 `prefect worker start --type process` workers on one pool, a flow run per shard) and
      `dataset.workers: 2` (a local Dask cluster of 2 processes). Same rows and ids;
      throughput ratio (target within 10%: on a 2-core machine the teacher client's CPU is
      the limit either way).
  (3) per-stage prompts/s of the large build (from its manifest's stage_seconds) and its
      bytes on disk per accepted row, for the sizing table in docs/scaling.md.

    python bench/streaming_build.py [--small 20000] [--large 200000] [--fanout-prompts 40000]
                                    [--shard-rows 10000] [--concurrency 64] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The fake teacher's helpers are bench/teacher_throughput.py's (same server, key and prompts).
from bench.teacher_throughput import start_servers, write_build_config  # noqa: E402
from distillflow.config import DatasetConfig  # noqa: E402


POOL = "bench-shards"


def write_config(
    workdir: Path, base_url: str, n: int, args: argparse.Namespace, workers: int = 1, pool: str | None = None
) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = {"shard_rows": args.shard_rows, "workers": workers}
    if pool is not None:
        dataset["work_pool"] = pool
    return write_build_config(workdir, base_url, n, args.concurrency, name="bench-streaming", dataset=dataset)


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants, MB."""
    import psutil

    try:
        process = psutil.Process(pid)
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def build(config: Path, env: dict[str, str]) -> dict:
    """`distill build CONFIG` in its own process: wall time, peak RSS of its process tree, manifest."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "distillflow.cli", "build", str(config)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)
    reader.start()
    while process.poll() is None:
        peak = max(peak, tree_rss_mb(process.pid))
        time.sleep(0.1)
    elapsed = time.perf_counter() - started
    reader.join(5)
    if process.returncode != 0:
        raise RuntimeError(f"build failed ({process.returncode}):\n{''.join(stderr)[-4000:]}")
    import yaml

    out = Path(yaml.safe_load(config.read_text())["output_dir"])
    manifest = json.loads((out / "manifest.json").read_text())
    return {"elapsed_s": elapsed, "peak_rss_mb": peak, "manifest": manifest, "out": out}


def ids_of(out: Path) -> list[str]:
    from distillflow.storage.parquet import read_table

    return read_table(out / "data", columns=["id"]).column("id").to_pylist()


def disk_bytes(out: Path) -> int:
    return sum(path.stat().st_size for part in ("data", "rejects") for path in (out / part).glob("*.parquet"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=200_000)
    parser.add_argument("--fanout-prompts", type=int, default=40_000)
    parser.add_argument("--shard-rows", type=int, default=DatasetConfig.model_fields["shard_rows"].default)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    from provenance import provenance  # bench/provenance.py, beside this script
    print(provenance(), flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="distill-stream-bench-"))
    env, base_url, processes = start_servers(
        workdir, args.latency_ms, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    try:
        print(f"shard_rows {args.shard_rows}, concurrency {args.concurrency}, server latency {args.latency_ms:.0f} ms",
              flush=True)

        runs = {}
        for label, n in (("small", args.small), ("large", args.large)):
            runs[label] = build(write_config(workdir / label, base_url, n, args), env)
            run = runs[label]
            print(f"  {label}: {n} prompts, {run['elapsed_s']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB, "
                  f"stages {run['manifest']['stage_seconds']}", flush=True)
        ratio = runs["large"]["peak_rss_mb"] / runs["small"]["peak_rss_mb"]

        for worker in range(2):  # the work pool's workers (they wait for runs from the start)
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
                 "--name", f"bench-{worker}"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        fan = {}
        for label, workers, pool in (("1 process", 1, None), ("work pool", 2, POOL), ("dask", 2, None)):
            config = write_config(workdir / f"fanout-{label.replace(' ', '-')}", base_url, args.fanout_prompts, args,
                                  workers, pool)
            fan[label] = build(config, env)
            print(f"  fan-out, {label} ({workers}): {args.fanout_prompts} prompts, {fan[label]['elapsed_s']:.1f} s, "
                  f"peak RSS (parent tree) {fan[label]['peak_rss_mb']:.0f} MB, teacher stage "
                  f"{fan[label]['manifest']['stage_seconds']['teacher']:.1f} s", flush=True)
        same = {label: ids_of(fan[label]["out"]) == ids_of(fan["1 process"]["out"]) for label in ("work pool", "dask")}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:  # a worker still winding down its flow runs
                process.kill()
                process.wait(10)

    print(f"(1) peak RSS: {args.large} prompts {runs['large']['peak_rss_mb']:.0f} MB vs {args.small} prompts "
          f"{runs['small']['peak_rss_mb']:.0f} MB: ratio {ratio:.3f} (target <= 1.2) "
          f"{'OK' if ratio <= 1.2 else 'ABOVE TARGET'}; "
          f"{1024 * (runs['large']['peak_rss_mb'] - runs['small']['peak_rss_mb']) / (args.large - args.small):.2f} KB per "
          "prompt at the margin")
    throughput = {label: args.fanout_prompts / fan[label]["elapsed_s"] for label in fan}
    stage = {label: args.fanout_prompts / fan[label]["manifest"]["stage_seconds"]["teacher"] for label in fan}
    one = "1 process"
    for label in ("work pool", "dask"):
        ratio_fan = throughput[label] / throughput[one]
        print(f"(2) fan-out over {label}, 2 workers: same ids {same[label]}; whole build {ratio_fan:.3f} of one process "
              f"({throughput[label]:.0f} vs {throughput[one]:.0f} prompts/s); teacher stage "
              f"{stage[label] / stage[one]:.3f} ({stage[label]:.0f} vs {stage[one]:.0f} prompts/s) (target >= 0.9) "
              f"{'OK' if ratio_fan >= 0.9 else 'BELOW TARGET'}")
    large = runs["large"]
    print(f"(3) per stage, {args.large} prompts (prompts/s):")
    for name, seconds in large["manifest"]["stage_seconds"].items():
        print(f"     {name:18s} {seconds:8.2f} s  {args.large / max(seconds, 1e-9):12.0f} /s")
    accepted = large["manifest"]["counts"]["accepted"]
    print(f"     on disk: {disk_bytes(large['out']) / accepted:.0f} bytes per accepted row (data + rejects, zstd); "
          f"ledger {(large['out'] / '.ledger' / 'teacher.sqlite').stat().st_size / accepted:.0f} bytes per answer")
    print(f"     whole build: {args.large / large['elapsed_s']:.0f} prompts/s ({large['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
