"""Teacher throughput: a bare AsyncOpenAI loop vs `distill build`, same server, same run.

A local OpenAI-compatible server (tests/openai_server.py) answers every request after a
fixed latency (default 50 ms) with unlimited capacity. Each side runs in its own process
so its peak RSS and CPU are its own; the CPU the teacher server and the Prefect server
spend during each run is printed too (on a 2-core machine every side is CPU-bound):

  (a)  bare:  `openai.AsyncOpenAI` as it comes + an asyncio.Semaphore(concurrency), answers
             kept in a list (`import openai` happens before its timer)
  (a') bare, lean: the same loop on the request path distillflow uses (the SDK's aiohttp
             transport, response body read as bytes) and with the garbage-collector settings
             of distillflow's client process (tasks/teacher/loop_gc.py `request_loop_gc`):
             the strongest bare baseline, so stage/a' (the flow's teacher stage, its
             stage_seconds in the manifest, against this loop) is the pipeline's own overhead;
             printed for reference, no target (on two shared cores it measures their noise)
  (b)  build: the `build_dataset` flow end to end (seeds → prompts → filters → teacher with
             ledger → response filters → Parquet + manifest) against a running Prefect
             server, default settings; also the wall time of the whole `distill build` CLI
             process (interpreter start, imports, flow), with the Prefect server running
             (CLI) and with none (CLI-none: the flows run without orchestration, what a
             first-time user gets). Targets: CLI/a >= 1.5 and CLI-none/a >= 1.5
  (b2) build with `teacher.client_processes: 2` (requests issued from two processes)

Each repeat runs a', b, a, CLI, CLI-none, CLI-none, CLI, a, b, a' (the two sides of each
target next to each other, A B B A, so a steady drift cancels); each target is the median over the repeats of
that repeat's own ratio, since the speed of a shared VM drifts by ±15 % from one minute to
the next. (b2) runs once, after the repeats.

    python bench/teacher_throughput.py [--prompts 20000] [--concurrency 64] [--latency-ms 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
API_KEY = "bench-key"
REPORT = ROOT / "runs" / "bench-throughput" / "teacher_throughput.json"


def versions() -> str:
    """The versions this figure depends on, as printed with it."""
    from provenance import versions as package_versions  # bench/provenance.py, beside this script

    found = package_versions(("openai", "httpx", "httpx2", "aiohttp", "prefect", "torch"))
    return f"versions: {found}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """This process plus its finished children (the client processes of `client_processes`)."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (the Prefect server forks workers)."""
    import psutil

    total = 0.0
    process = psutil.Process(pid)
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def prompts_for(n: int) -> list[str]:
    """n distinct prompts of random words (seeded), far apart in Jaccard similarity."""
    import random

    rng = random.Random(1234)
    vocabulary = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "po", "ru", "si", "ta", "vu", "ze")
                  for b in ("bar", "cen", "dol", "fim", "gor", "hup", "jex", "kal", "mon", "nix",
                            "pes", "quo", "rad", "sul", "tiv", "urb", "vek", "wol", "yan", "zop")]
    return [f"Prompt {i}: " + " ".join(rng.choice(vocabulary) for _ in range(14)) + "?" for i in range(n)]


# -- (a) bare loop ----------------------------------------------------------------------------


async def bare_loop(base_url: str, prompts: list[str], concurrency: int, path: str = "default") -> int:
    """path "default": the SDK as it comes (`chat.completions.create`, httpx transport);
    "lean": the request path distillflow uses (aiohttp transport, body read as bytes); the
    caller sets the client process's GC settings."""
    import openai

    semaphore = asyncio.Semaphore(concurrency)
    http_client = openai.DefaultAioHttpClient() if path == "lean" else None
    async with openai.AsyncOpenAI(
        base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120, http_client=http_client
    ) as client:

        async def one(prompt: str) -> str:
            async with semaphore:
                if path == "lean":
                    body = await client.post(
                        "/chat/completions",
                        body={"model": "test-teacher", "messages": [{"role": "user", "content": prompt}],
                              "temperature": 0.7, "max_tokens": 512},
                        cast_to=bytes,
                    )
                    return json.loads(body)["choices"][0]["message"]["content"]
                response = await client.chat.completions.create(
                    model="test-teacher", messages=[{"role": "user", "content": prompt}], temperature=0.7, max_tokens=512
                )
                return response.choices[0].message.content

        answers = await asyncio.gather(*(one(p) for p in prompts))
    return sum(1 for a in answers if a)


def run_bare(args: argparse.Namespace) -> dict:
    import openai  # noqa: F401  (imported before the timer: the build side's imports are not timed either)

    prompts = prompts_for(args.prompts)
    gc_settings: contextlib.AbstractContextManager = contextlib.nullcontext()
    if args.path == "lean":  # the GC settings of distillflow's client process, as in it, before the loop
        from distillflow.tasks.teacher import request_loop_gc

        gc.collect()
        gc_settings = request_loop_gc()
    with gc_settings:
        started = time.perf_counter()
        answered = asyncio.run(bare_loop(args.base_url, prompts, args.concurrency, args.path))
        elapsed = time.perf_counter() - started
    return {"answered": answered, "elapsed_s": elapsed, "peak_rss_mb": peak_rss_mb(), "cpu_s": cpu_seconds()}


# -- (b) distill build --------------------------------------------------------------------------


def write_build_config(
    workdir: Path,
    base_url: str,
    n: int,
    concurrency: int,
    client_processes: int = 1,
    name: str = "bench-throughput",
    dataset: dict | None = None,
) -> Path:
    """Seeds of `n` prompts and a build config against the fake teacher at `base_url`
    (`dataset`: the config's `dataset:` section, when given)."""
    import yaml

    seeds = workdir / "seeds.jsonl"
    with open(seeds, "w") as handle:
        for prompt in prompts_for(n):
            handle.write(json.dumps({"prompt": prompt}) + "\n")
    config = {
        "name": name,
        "output_dir": str(workdir / "out"),
        "seeds": [{"path": str(seeds)}],
        "prompts": {"num_prompts": n, "strategies": {"seed": 1.0, "edge_case": 0.0, "adversarial": 0.0, "evolve": 0.0}},
        "teacher": {
            "backend": "openai",
            "base_url": base_url,
            "model": "test-teacher",
            "api_key_env": "BENCH_API_KEY",
            "max_concurrency": concurrency,
            "client_processes": client_processes,
            "generation": {"temperature": 0.7, "max_tokens": 512},
        },
    }
    if dataset is not None:
        config["dataset"] = dataset
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_servers(
    workdir: Path, latency_ms: float, **extra_env: str
) -> tuple[dict[str, str], str, list[subprocess.Popen]]:
    """The fake teacher (tests/openai_server.py, `latency_ms` per answer, unlimited capacity)
    and a `prefect server`, each in its own process, both answering their health checks.
    Returns (the environment for the bench's children, PREFECT_API_URL set; the teacher's
    base URL; the two processes, which the caller terminates)."""
    env = {**os.environ, "BENCH_API_KEY": API_KEY, "PREFECT_HOME": str(workdir / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_LOGGING_LEVEL": "WARNING",
           **extra_env}
    env.pop("PREFECT_API_URL", None)
    server_port, prefect_port = free_port(), free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "openai_server.py"), "--port", str(server_port),
             "--api-key", API_KEY, "--latency-ms", str(latency_ms), "--no-record"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            env={**env, "PREFECT_UI_ENABLED": "false"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        wait_http(f"http://127.0.0.1:{server_port}/health")
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health")
    except BaseException:
        for process in processes:
            process.terminate()
        raise
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{prefect_port}/api"
    return env, f"http://127.0.0.1:{server_port}/v1", processes


def run_build(args: argparse.Namespace) -> dict:
    from distillflow.config import load_config
    from distillflow.flows.build import build_dataset

    config = load_config(args.config)
    started = time.perf_counter()
    manifest = build_dataset(config)
    elapsed = time.perf_counter() - started
    return {
        "answered": manifest["counts"]["teacher_answered"],
        "accepted": manifest["counts"]["accepted"],
        "elapsed_s": elapsed,
        "peak_rss_mb": peak_rss_mb(),
        "cpu_s": cpu_seconds(),
        "stage_seconds": manifest["stage_seconds"],
    }


def child(mode: str, extra: list[str], env: dict[str, str], servers: dict[str, int]) -> dict:
    """Run one side in its own process; adds the CPU seconds each server spent meanwhile."""
    before = {name: process_cpu_seconds(pid) for name, pid in servers.items()}
    command = [sys.executable, __file__, "--child", mode, *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    run = json.loads(result.stdout.strip().splitlines()[-1])
    run["server_cpu_s"] = {name: process_cpu_seconds(pid) - before[name] for name, pid in servers.items()}
    return run


def describe(label: str, run: dict, prompts: int) -> str:
    servers = ", ".join(f"{name} {1000 * cpu / prompts:.2f}" for name, cpu in run["server_cpu_s"].items())
    return (f"{label}: {prompts / run['elapsed_s']:8.1f} prompts/s  ({run['elapsed_s']:.1f} s, "
            f"peak RSS {run['peak_rss_mb']:.0f} MB; CPU ms/prompt: this side {1000 * run['cpu_s'] / prompts:.2f}, "
            f"{servers})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="repeats of a' b a CLI CLI a b a'; each target is the median of the repeats' own ratios")
    parser.add_argument("--child", choices=["bare", "build"], help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=["default", "lean"], default="default", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "bare":
        print(json.dumps(run_bare(args)))
        return
    if args.child == "build":
        print(json.dumps(run_build(args)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    env, base_url, processes = start_servers(workdir, args.latency_ms)
    servers = {"teacher server": processes[0].pid, "Prefect server": processes[1].pid}
    try:
        print(f"python bench/teacher_throughput.py {' '.join(sys.argv[1:])}".rstrip())
        print(versions())
        print(f"{args.prompts} prompts, concurrency {args.concurrency}, server latency {args.latency_ms:.0f} ms, "
              f"{args.repeats} repeat(s) of a' b a CLI CLI-none CLI-none CLI a b a' "
              f"(targets: median of each repeat's ratio)")
        bare_args = ["--concurrency", str(args.concurrency), "--base-url", base_url]
        # Warm both bare paths and the build once on a small run (imports, connection set-up,
        # the Prefect server's first flow and task runs).
        for path in ("default", "lean"):
            child("bare", ["--prompts", "500", "--path", path, *bare_args], env, servers)
        (workdir / "warm-up").mkdir()
        child("build", ["--config", str(write_build_config(workdir / "warm-up", base_url, 500, args.concurrency))],
              env, servers)
        runs: dict[str, list[dict]] = {"default": [], "lean": [], "build": [], "build-2p": []}
        cli_runs: list[float] = []  # wall time of the whole `distill build` process
        no_server_runs: list[float] = []  # the same with no Prefect server
        no_server_env = {**env, "PREFECT_HOME": str(workdir / "prefect-none")}
        no_server_env.pop("PREFECT_API_URL")
        fresh = iter(range(10**6))  # a fresh output dir (and ledger) for every build

        def bare(path: str) -> None:
            runs[path].append(child("bare", ["--prompts", str(args.prompts), "--path", path, *bare_args], env, servers))

        def build(side: str, client_processes: int = 1) -> None:
            workdir_of = workdir / f"{side}-{next(fresh)}"
            workdir_of.mkdir()
            config = write_build_config(workdir_of, base_url, args.prompts, args.concurrency, client_processes)
            runs[side].append(child("build", ["--config", str(config)], env, servers))

        def cli(no_server: bool = False) -> None:
            # The whole CLI process (interpreter start, imports, flow).
            workdir_of = workdir / f"cli-{next(fresh)}"
            workdir_of.mkdir()
            config = write_build_config(workdir_of, base_url, args.prompts, args.concurrency)
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "distillflow.cli", "build", str(config)],
                           env=no_server_env if no_server else env, check=True, capture_output=True, timeout=1800)
            (no_server_runs if no_server else cli_runs).append(time.perf_counter() - started)

        stage_ratios: list[float] = []
        whole_ratios: list[float] = []
        no_server_ratios: list[float] = []
        for repeat in range(args.repeats):
            # The two sides of each target run next to each other, in the order A B B A, so a
            # steady drift of the machine's speed cancels out of each repeat's ratio.
            bare("lean")
            build("build")
            bare("default")
            cli()
            cli(no_server=True)
            cli(no_server=True)
            cli()
            bare("default")
            build("build")
            bare("lean")
            lean, built = runs["lean"][-2:], runs["build"][-2:]
            stage_ratios.append(sum(run["elapsed_s"] for run in lean) / sum(run["stage_seconds"]["teacher"] for run in built))
            whole_ratios.append(sum(run["elapsed_s"] for run in runs["default"][-2:]) / sum(cli_runs[-2:]))
            no_server_ratios.append(sum(run["elapsed_s"] for run in runs["default"][-2:]) / sum(no_server_runs[-2:]))
            assert all(side_runs[-1]["answered"] == args.prompts for side_runs in runs.values() if side_runs)
            def per_s(seconds: list[float]) -> str:
                return ", ".join(f"{args.prompts / value:.1f}" for value in seconds) + "/s"

            print(f"  repeat {repeat}: lean {per_s([run['elapsed_s'] for run in lean])}, teacher stage "
                  f"{per_s([run['stage_seconds']['teacher'] for run in built])} -> stage/a' {stage_ratios[-1]:.3f}; "
                  f"SDK default {per_s([run['elapsed_s'] for run in runs['default'][-2:]])}, CLI {per_s(cli_runs[-2:])} "
                  f"-> CLI/a {whole_ratios[-1]:.3f}; CLI-none {per_s(no_server_runs[-2:])} -> CLI-none/a "
                  f"{no_server_ratios[-1]:.3f}", flush=True)
        build("build-2p", 2)  # for reference: requests from two client processes
        assert runs["build-2p"][-1]["answered"] == args.prompts
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)

    best = {side: min(side_runs, key=lambda run: run["elapsed_s"]) for side, side_runs in runs.items()}
    rate = {side: args.prompts / run["elapsed_s"] for side, run in best.items()}
    print(describe("(a)  bare AsyncOpenAI loop, SDK defaults       ", best["default"], args.prompts))
    print(describe("(a') bare loop on distillflow's request path  ", best["lean"], args.prompts))
    print(describe("(b)  distill build (flow, Prefect server)     ", best["build"], args.prompts))
    print(f"     stages (s): {best['build']['stage_seconds']}")
    print(describe("(b2) distill build, teacher.client_processes: 2", best["build-2p"], args.prompts))
    print(f"     stages (s): {best['build-2p']['stage_seconds']}")
    print(f"     distill build (CLI process): {args.prompts / min(cli_runs):8.1f} prompts/s  "
          f"({min(cli_runs):.1f} s incl. interpreter start and imports)")
    print(f"     distill build (CLI process, no server): {args.prompts / min(no_server_runs):8.1f} prompts/s  "
          f"({min(no_server_runs):.1f} s)")
    # Targets: the median over the repeats of each repeat's ratio. The teacher stage of the
    # flow (answers from the endpoint, each recorded in the ledger as it arrives, batches as
    # Prefect tasks, response filters, shard files) against the bare loop on the same
    # request path with the same GC settings; the whole CLI process against the SDK-default loop.
    stage_ratio, whole = statistics.median(stage_ratios), statistics.median(whole_ratios)
    no_server = statistics.median(no_server_ratios)

    def listed(ratios: list[float]) -> str:
        return ", ".join(f"{ratio:.3f}" for ratio in ratios)

    print(f"ratio stage/a' (teacher stage of the flow vs bare loop, same request path and GC settings), "
          f"median of [{listed(stage_ratios)}]: {stage_ratio:.3f}  (for reference)")
    print(f"ratio CLI/a (whole `distill build` process vs bare SDK-default loop), median of [{listed(whole_ratios)}]: "
          f"{whole:.3f}  (target >= 1.5) {'OK' if whole >= 1.5 else 'BELOW TARGET'}")
    print(f"ratio CLI-none/a (the same, no Prefect server running), median of [{listed(no_server_ratios)}]: "
          f"{no_server:.3f}  (target >= 1.5) {'OK' if no_server >= 1.5 else 'BELOW TARGET'}")
    report = {
        "command": f"python bench/teacher_throughput.py {' '.join(sys.argv[1:])}".rstrip(),
        "versions": versions(), "prompts": args.prompts, "concurrency": args.concurrency,
        "latency_ms": args.latency_ms, "repeats": args.repeats,
        "prompts_per_s": {
            "bare_sdk_default": rate["default"], "bare_lean": rate["lean"], "flow": rate["build"],
            "flow_2_client_processes": rate["build-2p"],
            "cli_server": args.prompts / min(cli_runs), "cli_no_server": args.prompts / min(no_server_runs),
        },
        "cli_server_over_bare": whole_ratios, "cli_no_server_over_bare": no_server_ratios,
        "stage_over_lean": stage_ratios,
    }
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"ratio b/a'  (whole flow vs bare loop, same request path, best runs)  : {rate['build'] / rate['lean']:.3f}")
    print(f"ratio b/a   (flow vs bare SDK-default loop, best runs)               : {rate['build'] / rate['default']:.3f}")
    print(f"ratio b2/a' (2 client processes vs bare loop, same path, best runs)  : {rate['build-2p'] / rate['lean']:.3f}")
    print(f"ratio b2/a  (2 client processes vs bare SDK-default loop, best runs) : {rate['build-2p'] / rate['default']:.3f}")
    print(f"report: {REPORT.relative_to(ROOT)} (scripts/render_tables.py --save puts it into docs/benchmarks.md)")


def table(report: dict) -> str:
    """The throughput table of docs/benchmarks.md, from a report of this script."""
    rate = report["prompts_per_s"]

    def ratios(values: list[float]) -> str:
        return f"**{statistics.median(values):.2f}×** (repeats: {', '.join(f'{v:.2f}' for v in values)})"

    rows = [
        "| side | prompts/s (best run) | whole `distill build` / bare SDK-default loop |",
        "|---|---:|---:|",
        f"| (a) bare `AsyncOpenAI` loop, SDK defaults | {rate['bare_sdk_default']:.0f} | |",
        f"| (a') bare loop on distillflow's request path | {rate['bare_lean']:.0f} | |",
        f"| (b) the flow in process, Prefect server running | {rate['flow']:.0f} | |",
        f"| (b2) the flow, `teacher.client_processes: 2` | {rate['flow_2_client_processes']:.0f} | |",
        f"| `distill build` CLI process, Prefect server running | {rate['cli_server']:.0f} | "
        f"{ratios(report['cli_server_over_bare'])} |",
        f"| `distill build` CLI process, no server | {rate['cli_no_server']:.0f} | "
        f"{ratios(report['cli_no_server_over_bare'])} |",
    ]
    return "\n".join(rows) + (
        f"\n\n`{report['command']}`: {report['prompts']} prompts, concurrency {report['concurrency']}, "
        f"{report['latency_ms']:.0f} ms per answer; {report['versions']}."
    )


if __name__ == "__main__":
    main()
