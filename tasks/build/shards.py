"""A build in shards: the answered prompts go to disk one shard at a time, and a crashed
build resumes at the first unfinished shard.

The prompt side (generation, exact/near/semantic dedup, diversity) decides once over the
whole prompt set, so its decisions are global (first in input order is kept) and do not
depend on the shard size. The prompts it keeps are then cut into shards of
`dataset.shard_rows` prompts; each shard goes through the teacher (ledger first) and the
response filters, and is written under `output_dir/.building/`:

    .building/data/part-0000k.parquet      accepted rows of shard k
    .building/rejects/part-0000P.parquet   rejects before the teacher (P files, P ≥ 1)
    .building/rejects/part-000(P+k).parquet teacher and response-filter rejects of shard k
    .building/prompts/shard-0000k.parquet  the kept prompts of shard k (id, prompt, strategy, parent_id)
    .building/state.json                   the plan's fingerprint and every finished shard

Once the prompt side has decided, the kept prompts are written out shard by shard and
dropped from memory: the teacher stage, in this process or on a fan-out worker, reads
one shard's prompts at a time, so its memory does not grow with the dataset.

A shard's files are written atomically (temp name + rename) and the state after them, so
a shard listed in the state is complete. When every shard is done, `.building/data` and
`.building/rejects` are swapped in as `data/` and `rejects/`, the card and then the
manifest are written. A rerun with the same plan (same kept prompts, shard size, teacher
request parameters and response filters) keeps every finished shard whose files still
match their sha256 and had no teacher failure (those prompts are asked again, as
in a build without shards); anything else starts over. Answers come from the ledger
either way, so nothing is paid twice.

With one shard the dataset is the one an unsharded build writes: the same rows in the
same order (the rejects are split over two files instead of one).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from distillflow.config import DistillConfig
from distillflow.records import (
    PromptRecord,
    Reject,
    TeacherAnswer,
    is_failure_reason,
    stopped_answer,
)
from distillflow.storage.atomic import write_json_atomic
from distillflow.storage.parquet import (
    REJECT_SCHEMA,
    AnsweredRow,
    ShardWriter,
    accepted_schema,
    file_sha256,
    write_table_atomic,
)
from distillflow.tasks.filters.passes import filter_responses

BUILDING = ".building"
STATE_NAME = "state.json"
STATE_VERSION = 1
PROMPTS = "prompts"
PROMPT_FIELDS = ("id", "prompt", "strategy", "parent_id")
PROMPT_SCHEMA = pa.schema([(name, pa.string()) for name in PROMPT_FIELDS])


def shard_ranges(count: int, shard_rows: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard over `count` prompts; one (empty) shard when there are none."""
    return [(start, min(start + shard_rows, count)) for start in range(0, count, shard_rows)] or [(0, 0)]


def shard_prompts_path(staging: Path, index: int) -> Path:
    return Path(staging) / PROMPTS / f"shard-{index:05d}.parquet"


def write_shard_prompts(staging: Path, kept: Sequence[PromptRecord], plan: Sequence[tuple[int, int]],
                        skip: Collection[int] = ()) -> None:
    """The kept prompts of every shard not in `skip` as `.building/prompts/shard-k.parquet`
    (each written atomically)."""
    for index, (start, stop) in enumerate(plan):
        if index in skip:
            continue
        records = kept[start:stop]
        columns = {name: [getattr(record, name) for record in records] for name in PROMPT_FIELDS}
        write_table_atomic(pa.Table.from_pydict(columns, schema=PROMPT_SCHEMA), shard_prompts_path(staging, index))


def read_shard_prompts(staging: Path, index: int) -> list[PromptRecord]:
    """The prompts of shard `index`, as `write_shard_prompts` wrote them."""
    return [record for batch in read_shard_prompt_batches(staging, index, [None]) for record in batch]


def read_shard_prompt_batches(
    staging: Path, index: int, sizes: Iterable[int | None]
) -> Iterator[list[PromptRecord]]:
    """The prompts of shard `index` in consecutive batches of `sizes` (None: the rest),
    each made into records only when it is asked for: the first batch of a 10,000-prompt
    shard is ready in a fifth of the time the whole shard takes."""
    path = shard_prompts_path(staging, index)
    try:
        table = pq.read_table(path, schema=PROMPT_SCHEMA)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: the prompts of shard {index} are missing; every shard worker must see the build's "
            "output_dir (a shared filesystem), and the build must not be cleaned up while it runs"
        ) from None
    first = 0
    for size in sizes:
        if first >= table.num_rows:
            return
        part = table.slice(first, size)
        first += part.num_rows
        yield [PromptRecord(*values) for values in zip(*(part.column(name).to_pylist() for name in PROMPT_FIELDS))]


def plan_fingerprint(kept: Sequence[PromptRecord], config: Any, prompt_rejects: int) -> str:  # DistillConfig
    """sha256 over everything that decides what a shard holds: the kept prompts in order,
    the shard size, the number of rejects before the teacher (they number the reject files),
    the teacher's request (model, backend, generation, system prompt) and the filters."""
    digest = hashlib.sha256()
    teacher = config.teacher
    header = {
        "version": STATE_VERSION,
        "shard_rows": config.dataset.shard_rows,
        "prompt_rejects": prompt_rejects,
        "teacher": {
            "backend": teacher.backend,
            "model": teacher.model,
            "system_prompt": teacher.system_prompt,
            "generation": teacher.generation.model_dump(mode="json"),
            **({"stops": teacher.stops} if teacher.stops else {}),
        },
        "filters": config.filters.model_dump(mode="json"),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for record in kept:
        digest.update(f"\n{record.id}\t{record.strategy}\t{record.parent_id}".encode())
    return digest.hexdigest()


def answered_rows(
    prompts: Sequence[PromptRecord],
    answers: Sequence[tuple[TeacherAnswer, float]],
    teacher_name: str,
    with_top_logprobs: bool,
    stops: Sequence[str] = (),
) -> tuple[list[AnsweredRow], list[Reject]]:
    """Accepted rows of the answered prompts and a reject per prompt the teacher did not answer.
    Each answer is cut at its first stop string (`teacher.stops`), if the teacher did not stop there itself."""
    rows: list[AnsweredRow] = []
    rejects: list[Reject] = []
    for record, (answer, created_at) in zip(prompts, answers):
        answer = stopped_answer(answer, stops)
        if not answer.ok:
            rejects.append(Reject.of(record, answer.error or "teacher_error:unknown", answer.error_detail or ""))
            continue
        row: AnsweredRow = {
            "id": record.id,
            "prompt": record.prompt,
            "response": answer.content or "",
            "strategy": record.strategy,
            "parent_id": record.parent_id,
            "teacher_model": answer.model or teacher_name,
            "finish_reason": answer.finish_reason,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "created_at": datetime.fromtimestamp(created_at, tz=UTC),
        }
        if with_top_logprobs:
            row["top_logprobs"] = answer.top_logprobs
        rows.append(row)
    return rows, rejects


def example_details(rejects: Sequence[Reject], into: dict[str, str]) -> dict[str, str]:
    """The first `detail` seen per reason (for error messages), added to `into`."""
    for reject in rejects:
        into.setdefault(reject.reason, reject.detail)
    return into


@dataclass
class ShardResult:
    """What a finished shard holds; kept in the build state, summed into the manifest."""

    index: int
    prompts: int
    answered: int  # teacher answers (rows that reached the response filters)
    teacher_errors: int
    teacher_failures: int  # of those, prompts the teacher failed (not per-prompt API refusals)
    accepted: int
    data: dict[str, Any]  # ShardInfo.to_dict() of data/part-k
    rejects: dict[str, Any]  # ShardInfo.to_dict() of its rejects file
    reject_reasons: dict[str, int] = field(default_factory=dict)
    teacher_reasons: dict[str, int] = field(default_factory=dict)
    response_reasons: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one detail
    accepted_per_strategy: dict[str, int] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)  # teacher stats of a worker that answered it


def finish_shard(
    index: int,
    prompts: int,
    rows: list[AnsweredRow],
    teacher_rejects: list[Reject],
    filters: Any,  # FiltersConfig
    staging: Path,
    reject_file_index: int,
    with_top_logprobs: bool,
) -> ShardResult:
    """Response filters over one shard's answered rows, then its data file and its rejects
    file (each written atomically). Returns what the state and the manifest need."""
    accepted, response_rejects = filter_responses(rows, filters)
    return write_shard(
        index, prompts, len(rows), accepted, teacher_rejects, response_rejects, staging, reject_file_index,
        with_top_logprobs,
    )


@dataclass
class _Collected:
    answered: int = 0
    accepted: list[AnsweredRow] = field(default_factory=list)
    teacher_rejects: list[Reject] = field(default_factory=list)
    response_rejects: list[Reject] = field(default_factory=list)


class ShardCollector:
    """The shards being answered, in the process that runs it: each batch of answered rows
    goes through the response filters as it comes in (`add`), so a shard's files follow
    its last answer at once (`write`). The build uses it directly, or through the shard
    writer process (tasks/build/shard_writer.py), which runs one with the same two calls."""

    def __init__(self, filters: Any, staging: Path, with_top_logprobs: bool) -> None:  # filters: FiltersConfig
        self.filters, self.staging, self.with_top_logprobs = filters, staging, with_top_logprobs
        self._shards: dict[int, _Collected] = {}

    def add(self, index: int, rows: list[AnsweredRow], teacher_rejects: Sequence[Reject] = ()) -> None:
        """Filter `rows` (answered rows of shard `index`, in order) into that shard, with the
        shard's prompts the teacher did not answer in this batch."""
        shard = self._shards.setdefault(index, _Collected())
        accepted, response_rejects = filter_responses(rows, self.filters, shown=False)
        shard.answered += len(rows)
        shard.accepted.extend(accepted)
        shard.response_rejects.extend(response_rejects)
        shard.teacher_rejects.extend(teacher_rejects)

    def write(self, index: int, prompts: int, reject_file_index: int) -> ShardResult:
        """Write shard `index` (its `prompts` prompts) from what was added to it."""
        shard = self._shards.pop(index, None) or _Collected()
        return write_shard(
            index, prompts, shard.answered, shard.accepted, shard.teacher_rejects, shard.response_rejects,
            self.staging, reject_file_index, self.with_top_logprobs,
        )

    def forget(self, index: int) -> None:
        """Drop what was added to shard `index` (its write will not come)."""
        self._shards.pop(index, None)


def write_shard(
    index: int,
    prompts: int,
    answered: int,
    accepted: list[AnsweredRow],
    teacher_rejects: list[Reject],
    response_rejects: list[Reject],
    staging: Path,
    reject_file_index: int,
    with_top_logprobs: bool,
) -> ShardResult:
    """One shard's data file (`accepted`: its answered rows that passed the response
    filters) and rejects file (its teacher rejects, then its response rejects), each
    written atomically."""
    rejects = teacher_rejects + response_rejects
    data_writer = ShardWriter(
        staging / "data", accepted_schema(with_top_logprobs), max(len(accepted), 1), root=staging, first_index=index
    )
    data_writer.write(accepted)
    reject_writer = ShardWriter(
        staging / "rejects", REJECT_SCHEMA, max(len(rejects), 1), root=staging, first_index=reject_file_index
    )
    reject_writer.write(r.to_row() for r in rejects)
    (data_info,), (reject_info,) = data_writer.close(), reject_writer.close()
    return ShardResult(
        index=index,
        prompts=prompts,
        answered=answered,
        teacher_errors=len(teacher_rejects),
        teacher_failures=sum(1 for r in teacher_rejects if is_failure_reason(r.reason)),
        accepted=len(accepted),
        data=data_info.to_dict(),
        rejects=reject_info.to_dict(),
        reject_reasons=dict(Counter(r.reason for r in rejects)),
        teacher_reasons=dict(Counter(r.reason for r in teacher_rejects)),
        response_reasons=dict(Counter(r.reason for r in response_rejects)),
        examples=example_details(rejects, {}),
        accepted_per_strategy=dict(Counter(str(row.get("strategy")) for row in accepted)),
    )


def write_prompt_rejects(staging: Path, rejects: Sequence[Reject], rows_per_file: int) -> list[dict[str, Any]]:
    """The rejects made before the teacher (bad seeds, generation, prompt filters) as
    `rejects/part-00000.parquet`, ... (at least one file). Returns their ShardInfo dicts."""
    writer = ShardWriter(staging / "rejects", REJECT_SCHEMA, rows_per_file, root=staging)
    writer.write(reject.to_row() for reject in rejects)
    return [info.to_dict() for info in writer.close()]


class BuildState:
    """The finished shards of a build in progress, in `output_dir/.building/state.json`."""

    def __init__(self, output_dir: str | Path, fingerprint: str) -> None:
        self.staging = Path(output_dir) / BUILDING
        self.fingerprint = fingerprint
        self.finished: dict[int, ShardResult] = {}
        self.prompt_reject_files: list[dict[str, Any]] = []

    @property
    def path(self) -> Path:
        return self.staging / STATE_NAME

    @classmethod
    def open(cls, output_dir: str | Path, fingerprint: str) -> tuple[BuildState, int]:
        """The state for this plan: the finished shards of an earlier run of the same plan
        whose files are intact and which had no teacher failure; a clean staging area
        otherwise. Returns (state, shards kept)."""
        state = cls(output_dir, fingerprint)
        previous = state._read()
        if previous is None or previous.get("fingerprint") != fingerprint:
            shutil.rmtree(state.staging, ignore_errors=True)
            state.staging.mkdir(parents=True, exist_ok=True)
            return state, 0
        for entry in previous.get("finished", []):
            result = ShardResult(**entry)
            if result.teacher_failures == 0 and state._intact(result):
                state.finished[result.index] = result
        state._remove_unlisted()
        return state, len(state.finished)

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _intact(self, result: ShardResult) -> bool:
        for info in (result.data, result.rejects):
            path = self.staging / info["path"]
            if not path.is_file() or path.stat().st_size != info["bytes"] or file_sha256(path) != info["sha256"]:
                return False
        return True

    def _remove_unlisted(self) -> None:
        """Files of shards not kept (unfinished, damaged, or left by a temp write) go."""
        keep = {self.staging / r.data["path"] for r in self.finished.values()}
        keep |= {self.staging / r.rejects["path"] for r in self.finished.values()}
        for part in ("data", "rejects"):
            for path in (self.staging / part).glob("*") if (self.staging / part).is_dir() else []:
                if path not in keep:
                    path.unlink(missing_ok=True)

    def set_prompt_rejects(self, files: list[dict[str, Any]]) -> None:
        self.prompt_reject_files = files
        self._save()

    def record(self, result: ShardResult) -> None:
        """Mark a shard finished (after its files are written)."""
        self.finished[result.index] = result
        self._save()

    def _save(self) -> None:
        write_json_atomic(
            self.path,
            {
                "version": STATE_VERSION,
                "fingerprint": self.fingerprint,
                "prompt_reject_files": self.prompt_reject_files,
                "finished": [asdict(self.finished[index]) for index in sorted(self.finished)],
            },
        )

    def shards(self) -> dict[str, list[dict[str, Any]]]:
        """The manifest's `shards`: data files in shard order, rejects before the teacher first."""
        ordered = [self.finished[index] for index in sorted(self.finished)]
        return {
            "data": [result.data for result in ordered],
            "rejects": self.prompt_reject_files + [result.rejects for result in ordered],
        }


@dataclass
class ShardTotals:
    """The finished shards summed up, for the manifest and the end-of-run checks."""

    answered: int = 0
    teacher_errors: int = 0
    accepted: int = 0
    reject_reasons: Counter = field(default_factory=Counter)
    teacher_reasons: Counter = field(default_factory=Counter)
    response_reasons: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    accepted_per_strategy: Counter = field(default_factory=Counter)

    @classmethod
    def of(cls, results: Sequence[ShardResult]) -> ShardTotals:
        totals = cls()
        for result in results:
            totals.answered += result.answered
            totals.teacher_errors += result.teacher_errors
            totals.accepted += result.accepted
            totals.reject_reasons.update(result.reject_reasons)
            totals.teacher_reasons.update(result.teacher_reasons)
            totals.response_reasons.update(result.response_reasons)
            for reason, detail in result.examples.items():
                totals.examples.setdefault(reason, detail)
            totals.accepted_per_strategy.update(result.accepted_per_strategy)
        return totals


def answer_shard(
    index: int,
    config: Any,  # DistillConfig
    reject_file_index: int,
    ledger_path: Path,
) -> ShardResult:
    """One shard end to end in the calling process (a fan-out worker): its prompts from
    `.building/prompts/`, its own teacher
    client (replicas included), its own connection to the run's ledger (SQLite WAL: several
    processes may write it, on one filesystem), its own failure budget over the shard's
    prompts; then the response filters and its files. The API key is read here, from this
    process's environment, so it never travels as a parameter."""
    from distillflow.storage.ledger import Ledger
    from distillflow.tasks.teacher.budget import FailureBudget
    from distillflow.tasks.teacher.choose import make_teacher
    from distillflow.tasks.teacher.protocol import build_messages, resolve_api_key
    from distillflow.tasks.teacher.recording import answer_requests

    teacher_config = config.teacher
    staging = Path(config.output_dir) / BUILDING
    prompts = read_shard_prompts(staging, index)
    api_key = resolve_api_key(teacher_config.api_key_env)
    teacher = make_teacher(teacher_config, api_key)
    ledger = Ledger(ledger_path)
    budget = FailureBudget(len(prompts), teacher_config, on_exceeded=teacher.abort)
    try:
        messages_list = [build_messages(record.prompt, teacher_config.system_prompt) for record in prompts]
        answers = answer_requests(teacher, ledger, messages_list, budget=budget)
    finally:
        teacher.close()
        ledger.close()
    with_top_logprobs = bool(teacher_config.generation.top_logprobs)
    rows, rejects = answered_rows(prompts, answers, teacher_config.model, with_top_logprobs, teacher_config.stops)
    result = finish_shard(
        index, len(prompts), rows, rejects, config.filters, staging, reject_file_index, with_top_logprobs
    )
    result.usage = teacher.stats.to_dict()
    return result


def failure_summary(totals: ShardTotals, prompts: int, max_error_rate: float) -> dict[str, Any]:
    """The manifest's `teacher_failures` from the shards' teacher rejects (fan-out builds,
    where each worker keeps its own `FailureBudget`)."""
    reasons = Counter(
        {reason: count for reason, count in totals.teacher_reasons.items() if is_failure_reason(reason)}
    )
    failed = sum(reasons.values())
    return {
        "failed": failed,
        "of": prompts,
        "rate": round(failed / prompts, 6) if prompts else 0.0,
        "max_error_rate": max_error_rate,
        "reasons": dict(reasons.most_common()),
    }


@dataclass
class ShardPlan:
    """The kept prompts of a build cut into shards, staged on disk: what the teacher stage answers."""

    ranges: list[tuple[int, int]]  # shard -> [start, stop) of the kept prompts
    state: BuildState  # the finished shards: those an earlier run of this plan wrote, then each new one
    resumed: int  # shards an earlier run of this plan had finished
    first_reject_file: int  # the rejects file of shard 0 (the rejects made before the teacher come first)
    prompts: int  # the kept prompts, all shards

    def unfinished(self) -> list[int]:
        return [index for index in range(len(self.ranges)) if index not in self.state.finished]

    def results(self) -> list[ShardResult]:
        return list(self.state.finished.values())


def plan_shards(config: DistillConfig, kept: list[PromptRecord], rejected: list[Reject]) -> ShardPlan:
    """Cut the kept prompts into shards of `dataset.shard_rows` and open the build state (the
    shards an earlier run of the same plan finished are kept); write the rejects made before
    the teacher (`rejected`) and every unfinished shard's prompts to the staging area, from
    where each shard's prompts are read when it is answered."""
    staging = config.output_dir / BUILDING
    ranges = shard_ranges(len(kept), config.dataset.shard_rows)
    state, resumed = BuildState.open(config.output_dir, plan_fingerprint(kept, config, len(rejected)))
    state.set_prompt_rejects(write_prompt_rejects(staging, rejected, config.dataset.shard_rows))
    write_shard_prompts(staging, kept, ranges, skip=state.finished)
    return ShardPlan(ranges, state, resumed, len(state.prompt_reject_files), len(kept))
