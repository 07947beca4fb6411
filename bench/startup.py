"""Fixed start-up of `distill` commands: wall time from the shell to exit, before and after.

Each side is a whole `distill` process as a user runs it, with no Prefect server configured
or running (no PREFECT_API_URL, nothing recorded by `distill server start`):

  build   `distill build CONFIG`: 10 prompts against a local OpenAI-compatible server
          (tests/openai_server.py, 50 ms per answer), a fresh output directory each run
  config  `distill config CONFIG` (loads and checks the config)
  help    `distill --help`
  floor   `python -c "import prefect"`: the interpreter and Prefect's import, nothing else

With no server, a command runs its flows without orchestration (distillflow/runs.py); after
the rounds, "after" builds again on Prefect's temporary server (DISTILL_ORCHESTRATION=prefect,
what every command paid before) and with a lasting server (`distill server start` once,
`distill server stop` at the end), as a user who keeps one running gets.

"before" is the code at `--baseline` (default: the last commit that ran every command on
Prefect's temporary server),
extracted with `git archive` and put first on PYTHONPATH; "after" is this checkout. Each
side has its own PREFECT_HOME, warmed by one untimed build (the database is created once,
as on a user's machine). Rounds alternate before/after so a drift of the machine's speed
hits both; each figure is the median over the rounds.

    python bench/startup.py [--rounds 3] [--baseline b00bcd8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from teacher_throughput import API_KEY, free_port, wait_http, write_build_config  # noqa: E402

BASELINE = "b00bcd8"  # the last commit whose commands all ran on Prefect's temporary server
PACKAGE_DIRS = {"flows": "flows", "tasks": "tasks", "prompts": "prompts", "training": "training",
                "storage": "storage", "configs": "configs"}
COMMAND_TIMEOUT_S = 300
REPORT = ROOT / "runs" / "bench-startup" / "startup.json"


def baseline_tree(commit: str, workdir: Path) -> Path:
    """The package as it was at `commit`, laid out as installed (distillflow.flows, …), in a
    directory to put first on PYTHONPATH."""
    source = workdir / "baseline-src"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True,
                             timeout=120).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True, timeout=120)
    for name, folder in PACKAGE_DIRS.items():
        (source / "distillflow" / name).symlink_to(source / folder, target_is_directory=True)
    site = workdir / "baseline-site"
    site.mkdir()
    (site / "distillflow").symlink_to(source / "distillflow", target_is_directory=True)
    return site


def side_env(workdir: Path, side: str, pythonpath: Path | None) -> dict[str, str]:
    env = {**os.environ, "BENCH_API_KEY": API_KEY, "PREFECT_HOME": str(workdir / f"prefect-{side}"),
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def timed(command: list[str], env: dict[str, str], cwd: Path) -> float:
    """Wall seconds of one process, from start to exit; fails loudly on a non-zero exit."""
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-4000:]}")
    return elapsed


def leftover_prefect_servers(home: Path) -> list[str]:
    """Processes still running with this PREFECT_HOME in their environment (none expected)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"PREFECT_HOME={home}".encode() in environ.split(b"\0"):
            found.append(proc.name)
    return found


def versions() -> str:
    from provenance import versions as package_versions  # bench/provenance.py, beside this script

    return package_versions(("prefect", "openai", "httpx", "httpx2", "aiohttp", "typer", "numba", "datasets"))


def table(report: dict) -> str:
    """The start-up table of docs/benchmarks.md, from a report of this script."""
    median = statistics.median

    def runs(values: list[float]) -> str:
        return ", ".join(f"{value:.2f}" for value in values)

    before, after = report["before"], report["after"]
    build = f"`distill build`, {report['prompts']} prompts"
    rows = [
        "| command | before (every command on Prefect's temporary server) | after | after/before |",
        "|---|---:|---:|---:|",
        f"| {build}, no server | {median(before['build']):.2f} s ({runs(before['build'])}) | "
        f"**{median(after['build']):.2f} s** ({runs(after['build'])}) | {median(after['build']) / median(before['build']):.2f} |",
        f"| {build}, `DISTILL_ORCHESTRATION=prefect` (temporary server) | | {median(report['temporary_server']):.2f} s "
        f"({runs(report['temporary_server'])}) | |",
        f"| {build}, `distill server start` once first | | {median(report['lasting_server']):.2f} s "
        f"({runs(report['lasting_server'])}) | |",
        f"| `distill config FILE` | {median(before['config']):.2f} s | {median(after['config']):.2f} s | "
        f"{median(after['config']) / median(before['config']):.2f} |",
        f"| `distill --help` | {median(before['help']):.2f} s | {median(after['help']):.2f} s | "
        f"{median(after['help']) / median(before['help']):.2f} |",
        f"| `python -c \"import prefect\"` (floor) | | {median(report['import_prefect']):.2f} s | |",
    ]
    return "\n".join(rows) + (
        f"\n\n`{report['command']}`, baseline `{report['baseline']}`, {report['rounds']} rounds, medians; "
        f"{report['versions']}; {report['cpus']} CPUs, load average {report['load_average']} at the end. "
        f"Processes left behind: {report.get('left_behind_before', '?')} (before), "
        f"{report.get('left_behind_after', '?')} (after)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE, help="commit measured as 'before'")
    parser.add_argument("--prompts", type=int, default=10)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="distill-startup-"))
    teacher_port = free_port()
    teacher = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "openai_server.py"), "--port", str(teacher_port),
         "--api-key", API_KEY, "--latency-ms", "50", "--no-record"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{teacher_port}/health")
        base_url = f"http://127.0.0.1:{teacher_port}/v1"
        sides = {"before": side_env(workdir, "before", baseline_tree(args.baseline, workdir)),
                 "after": side_env(workdir, "after", None)}
        distill = [sys.executable, "-m", "distillflow.cli"]
        runs = 0

        def build(side: str, **extra_env: str) -> float:
            nonlocal runs
            runs += 1
            run_dir = workdir / f"run-{runs}"
            run_dir.mkdir()
            config = write_build_config(run_dir, base_url, args.prompts, concurrency=64, name="startup")
            return timed([*distill, "build", str(config)], {**sides[side], **extra_env}, run_dir)

        config_dir = workdir / "config-only"
        config_dir.mkdir()
        config = write_build_config(config_dir, base_url, args.prompts, concurrency=64, name="startup")
        commands = {
            "build": build,
            "config": lambda side: timed([*distill, "config", str(config)], sides[side], workdir),
            "help": lambda side: timed([*distill, "--help"], sides[side], workdir),
        }
        print(f"python bench/startup.py {' '.join(sys.argv[1:])}".rstrip())
        print(f"{versions()}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; "
              f"baseline {args.baseline}; {args.rounds} round(s)")
        for side in sides:  # warm-up: creates each side's Prefect database, fills the OS file cache
            build(side)
        times: dict[tuple[str, str], list[float]] = {}
        floor: list[float] = []
        for round_index in range(args.rounds):
            order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
            for name, run in commands.items():
                for side in order:
                    times.setdefault((name, side), []).append(run(side))
            floor.append(timed([sys.executable, "-c", "import prefect"], sides["after"], workdir))

        # The after side on Prefect's temporary server, as every command ran before.
        temporary = [build("after", DISTILL_ORCHESTRATION="prefect") for _ in range(args.rounds)]

        # The after side with a lasting server: `distill server start` once, then the same builds.
        started = subprocess.run([*distill, "server", "start", "--port", str(free_port())], env=sides["after"],
                                 cwd=workdir, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        if started.returncode != 0:
            raise RuntimeError(f"distill server start failed:\n{started.stderr[-4000:]}")
        try:
            build("after")  # warm-up: the lasting server's first flow run
            with_server = [build("after") for _ in range(args.rounds)]
        finally:
            subprocess.run([*distill, "server", "stop"], env=sides["after"], cwd=workdir, capture_output=True,
                           timeout=COMMAND_TIMEOUT_S)

        report = {
            "command": f"python bench/startup.py {' '.join(sys.argv[1:])}".rstrip(),
            "versions": versions(), "cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 1),
            "baseline": args.baseline, "rounds": args.rounds, "prompts": args.prompts,
            "before": {name: times[(name, "before")] for name in commands},
            "after": {name: times[(name, "after")] for name in commands},
            "temporary_server": temporary, "lasting_server": with_server, "import_prefect": floor,
        }
        labels = {"build": f"distill build ({args.prompts} prompts, no server)", "config": "distill config FILE",
                  "help": "distill --help"}
        print(f"{'command':<40} {'before':>9} {'after':>9} {'after/before':>13}   (median wall s; all runs)")
        for name, label in labels.items():
            before, after = times[(name, "before")], times[(name, "after")]
            print(f"{label:<40} {statistics.median(before):9.2f} {statistics.median(after):9.2f} "
                  f"{statistics.median(after) / statistics.median(before):13.2f}   "
                  f"before {', '.join(f'{t:.2f}' for t in before)}; after {', '.join(f'{t:.2f}' for t in after)}")
        label = f"distill build ({args.prompts} prompts, temporary server)"
        print(f"{label:<40} {'':>9} {statistics.median(temporary):9.2f} {'':>13}   "
              f"after {', '.join(f'{t:.2f}' for t in temporary)}   (DISTILL_ORCHESTRATION=prefect)")
        label = f"distill build ({args.prompts} prompts, distill server start)"
        print(f"{label:<40} {'':>9} {statistics.median(with_server):9.2f} {'':>13}   "
              f"after {', '.join(f'{t:.2f}' for t in with_server)}")
        floor_label = 'python -c "import prefect" (floor)'
        print(f"{floor_label:<40} {'':>9} {statistics.median(floor):9.2f}")
        time.sleep(1.0)
        for side in sides:
            left = leftover_prefect_servers(workdir / f"prefect-{side}")
            report[f"left_behind_{side}"] = len(left)
            print(f"processes left behind ({side}): {len(left)}" + (f" (pids {', '.join(left)})" if left else ""))
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {REPORT.relative_to(ROOT)} (scripts/render_tables.py --save puts it into docs/benchmarks.md)")
    finally:
        teacher.terminate()
        teacher.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
