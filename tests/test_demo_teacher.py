"""The demo's task family and its teacher: checkable answers, a clean split, a competent teacher."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path


from distillflow.tasks.train.demo_teacher import SHIPPED_TEACHER, STAMP_FILE, DemoTrainingSettings, ensure_demo_teacher, version_key
from distillflow.prompts.adversarial import ADVERSARIAL, perturb_protected
from distillflow.prompts.config import AdversarialConfig
from distillflow.prompts.skills import ANSWERS, SKILLS, distinct, sample, split_of

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_each_skill_answers_right():
    assert ANSWERS["last"]("plimo") == "o"
    assert ANSWERS["before"]("plimo") == "m"
    assert ANSWERS["digit"]("4821") == "1"
    assert ANSWERS["tens"]("4821") == "2"
    assert ANSWERS["parity"]("479") == "odd" and ANSWERS["parity"]("10") == "even"
    assert ANSWERS["letter_in"]("plimo") == "i|l|m|o|p" and ANSWERS["digit_in"]("4841") == "1|4|8"
    assert ANSWERS["reverse"]("plim") == "milp"
    rng = random.Random(0)
    for _ in range(200):
        item = sample(rng, "train")
        assert item.argument in item.prompt and item.reference == ANSWERS[item.skill](item.argument)
        assert item.training_answer(rng) in item.valid_answers


def test_eval_arguments_never_appear_in_training_seeds():
    seeds = read_jsonl(ROOT / "prompts" / "seeds" / "skills.jsonl")
    heldout = read_jsonl(ROOT / "prompts" / "seeds" / "skills_eval.jsonl")
    train_args = {row["protect"][0] for row in seeds}
    eval_args = {row["protect"][0] for row in heldout}
    assert not train_args & eval_args
    assert {split_of(arg) for arg in train_args} == {"train"} and {split_of(arg) for arg in eval_args} == {"eval"}
    assert {row["skill"] for row in heldout} == set(SKILLS)


def test_shipped_seed_files_are_what_the_generator_makes():
    # the files are committed so users can read them; they must not drift from the code
    seeds = read_jsonl(ROOT / "prompts" / "seeds" / "skills.jsonl")
    heldout = read_jsonl(ROOT / "prompts" / "seeds" / "skills_eval.jsonl")
    assert seeds == [item.record() for item in distinct(len(seeds), seed=0, split="train")]
    assert heldout == [item.record() for item in distinct(len(heldout), seed=1, split="eval")]


def test_perturbations_keep_the_protected_argument():
    config = AdversarialConfig(severity=1.0)
    rng = random.Random(3)
    for item in distinct(50, seed=5, split="eval"):
        for kind, perturb in ADVERSARIAL.items():
            out = perturb_protected(item.prompt, [item.argument], perturb, rng, config)
            if out is not None:
                assert item.argument in out, (kind, out)
    # a perturbation that can only damage the span gives up instead of changing the answer
    assert perturb_protected("x", ["x"], lambda text, rng, config: "", rng, config) is None


def test_training_script_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "teacher"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_demo_teacher.py"), "--out", str(out),
         "--steps", "2", "--eval-questions", "4", "--log-every", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    stamp = json.loads((out / STAMP_FILE).read_text())
    assert stamp["steps"] == 2 and 0.0 <= stamp["clean_exact_match"] <= 1.0
    assert "greedy accuracy" in (out / "README.md").read_text()
    assert stamp["version_key"] == version_key(DemoTrainingSettings(steps=2))


def test_shipped_teacher_is_current_and_used_without_training(tmp_path):
    assert ensure_demo_teacher(tmp_path) == SHIPPED_TEACHER
    assert not (tmp_path / "demo-teacher").exists()
    stamp = json.loads((SHIPPED_TEACHER / STAMP_FILE).read_text())
    assert stamp["clean_exact_match"] >= 0.75  # 78.8 %: reversing a word is still mostly wrong (docs)
    size = sum(path.stat().st_size for path in SHIPPED_TEACHER.iterdir())
    assert size <= 10 * 2**20


def test_shipped_teacher_answers_heldout_questions():
    from distillflow.config import TeacherConfig
    from distillflow.tasks.teacher.local import LocalTeacher

    questions = distinct(60, seed=11, split="eval")
    config = TeacherConfig(
        backend="local", model=str(SHIPPED_TEACHER), device="cpu", local_batch_size=32,
        generation={"temperature": 0.0, "max_tokens": 16},
    )  # fmt: skip
    answers = LocalTeacher(config).answer_batch([[{"role": "user", "content": q.prompt}] for q in questions])
    scored = [(answer.content.strip() in q.valid_answers) for answer, q in zip(answers, questions) if q.skill != "reverse"]
    assert sum(scored) / len(scored) >= 0.8
    assert all(answer.finish_reason == "stop" for answer in answers)


def test_shipped_teacher_spreads_its_distribution_where_several_answers_are_right():
    """Where several answers are right, the teacher's first answer token is far from one-hot
    (what soft targets carry and one greedy answer does not), while its greedy pick stays right."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TEACHER)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_TEACHER, dtype=torch.float32).eval()

    def first_token(skill: str) -> tuple[float, float]:
        """Mean entropy (nats) of the first answer token, and the share of greedy picks that are right."""
        questions = [q for q in distinct(240, seed=12, split="eval") if q.skill == skill][:20]
        entropies, right = [], []
        for question in questions:
            text = tokenizer.apply_chat_template([{"role": "user", "content": question.prompt}], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                probs = torch.softmax(model(ids).logits[0, -1].float(), -1)  # (V,)
            entropies.append(-(probs * probs.clamp_min(1e-12).log()).sum().item())
            right.append(tokenizer.convert_ids_to_tokens(int(probs.argmax())) in question.valid_answers)
        return sum(entropies) / len(entropies), sum(right) / len(right)

    several, one = first_token("letter_in"), first_token("last")
    assert several[0] >= 2 * one[0] and several[0] >= 1.0, (several, one)
    assert several[1] >= 0.8, several
