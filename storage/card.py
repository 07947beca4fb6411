"""The dataset card (README.md) and its Hugging Face YAML header.

The header is read by `datasets.load_dataset(DIR)` and by the Hub's dataset viewer:
`configs` names the accepted shards (`data/*.parquet`) as the one `train` split, so rejects
and mining candidates next to them are never loaded as data; `dataset_info` gives the
features (from the shards' Parquet schema) and the split's size; `size_categories`,
`task_categories` and `license` (from the config's `license`, when set) let the Hub file it.
It is computed from the shards on disk, so it always describes what is there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from distillflow.storage.atomic import write_text_atomic
from distillflow.storage.parquet import list_shards

CARD_NAME = "README.md"
DATA_FILES = "data/*.parquet"
SIZE_CATEGORIES = [  # the Hub's buckets: (upper bound, label)
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
    (100_000_000_000, "10B<n<100B"),
    (1_000_000_000_000, "100B<n<1T"),
]


def size_category(rows: int) -> str:
    """The Hub's `size_categories` label for a dataset of `rows` rows."""
    for bound, label in SIZE_CATEGORIES:
        if rows < bound:
            return label
    return "n>1T"


def split_stats(directory: str | Path) -> dict[str, Any]:
    """Schema, rows, uncompressed bytes (Parquet row-group metadata) and file bytes of data/."""
    shards = list_shards(Path(directory) / "data")
    if not shards:
        raise FileNotFoundError(f"{directory}/data has no .parquet shards: nothing to describe in the card")
    rows = uncompressed = on_disk = 0
    schemas = []
    for path in shards:
        metadata = pq.read_metadata(path)
        rows += metadata.num_rows
        uncompressed += sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
        on_disk += path.stat().st_size
        schemas.append(pq.read_schema(path))
    schema = pa.unify_schemas(schemas, promote_options="permissive").remove_metadata()
    return {"schema": schema, "rows": rows, "num_bytes": uncompressed, "download_size": on_disk}


# Arrow types whose `datasets` feature is `{name, dtype: str(type)}` (datasets'
# `_arrow_to_datasets_dtype`, where only these names differ from Arrow's).
_FLAT_DTYPES = {"float": "float32", "double": "float64", "halffloat": "float16"}


def _flat_dtype(arrow_type: pa.DataType) -> str | None:
    """The `datasets` dtype of a primitive Arrow type; None for anything nested or special."""
    if pa.types.is_boolean(arrow_type):
        return "bool"
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        return _FLAT_DTYPES.get(str(arrow_type), str(arrow_type))
    if any(check(arrow_type) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                            pa.types.is_large_binary, pa.types.is_timestamp)):
        return str(arrow_type)
    return None


def flat_features(schema: pa.Schema) -> list[dict[str, str]] | None:
    """The card's `dataset_info.features` for a schema of primitive columns, as `datasets`
    writes them, without importing `datasets` (0.6 s: it imports pandas); None when a
    column is nested (lists, structs: top-k logprobs), which `datasets` then describes."""
    features = []
    for field in schema:
        dtype = _flat_dtype(field.type)
        if dtype is None:
            return None
        features.append({"name": field.name, "dtype": dtype})
    return features


def add_dataset_info(card_data: Any, stats: dict[str, Any]) -> None:
    """The card's `dataset_info` (features, the one train split, sizes) into `card_data`."""
    features = flat_features(stats["schema"])
    if features is not None:
        card_data.dataset_info = {
            "features": features,
            "splits": [{"name": "train", "num_bytes": stats["num_bytes"], "num_examples": stats["rows"]}],
            "download_size": stats["download_size"],
            "dataset_size": stats["num_bytes"],
        }
        return
    import datasets
    from datasets.info import DatasetInfosDict

    info = datasets.DatasetInfo(
        features=datasets.Features.from_arrow_schema(stats["schema"]),
        splits=datasets.SplitDict(
            {"train": datasets.SplitInfo(name="train", num_bytes=stats["num_bytes"], num_examples=stats["rows"])}
        ),
        download_size=stats["download_size"],
        dataset_size=stats["num_bytes"],
    )
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)


def card_header(directory: str | Path, manifest: dict[str, Any]) -> str:
    """The YAML front matter (`---` ... `---`) for the dataset in `directory`."""
    from huggingface_hub import DatasetCardData

    stats = split_stats(directory)
    config = manifest.get("config") or {}
    card_data = DatasetCardData(
        license=config.get("license"),
        task_categories=["text-generation"],
        size_categories=[size_category(stats["rows"])],
        pretty_name=manifest.get("name"),
        tags=["distillation", "synthetic", "distillflow"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES}]}],
    )
    add_dataset_info(card_data, stats)
    return f"---\n{card_data.to_yaml()}\n---\n"


def strip_front_matter(text: str) -> str:
    """A card's Markdown without its YAML header (if it has one)."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end != -1:
            return text[end + len("\n---\n") :].lstrip("\n")
    return text


def write_card(directory: str | Path, body: str, manifest: dict[str, Any]) -> Path:
    """Write README.md: the YAML header computed from the shards, then `body` (Markdown)."""
    path = Path(directory) / CARD_NAME
    write_text_atomic(path, card_header(directory, manifest) + "\n" + strip_front_matter(body), "the dataset card")
    return path


def refresh_card(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Recompute the header of an existing card (after columns were added to the shards)."""
    path = Path(directory) / CARD_NAME
    body = path.read_text(encoding="utf-8") if path.is_file() else f"# {manifest.get('name', 'dataset')}\n"
    return write_card(directory, body, manifest)
