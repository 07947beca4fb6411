"""What a bench figure ran on, printed first by every script in bench/: the command line and
the versions of the packages its figures depend on (docs/benchmarks.md quotes them)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

PACKAGES = ("torch", "transformers", "deepspeed", "openai", "httpx", "httpx2", "aiohttp", "prefect", "numba",
            "pyarrow", "datasets")


def versions(packages: tuple[str, ...] = PACKAGES) -> str:
    """`python 3.11.7, torch 2.13.0+cpu, …` for the packages installed."""
    found = [f"python {platform.python_version()}"]
    for name in packages:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def provenance() -> str:
    """The command that is running and what it runs on, as one line."""
    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "?"
    command = " ".join(["python", script, *sys.argv[1:]])
    return f"{command}\n{versions()}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}"
