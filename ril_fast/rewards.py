"""RIL rewards, teacher-guided groups and Dr.GRPO advantages (shared/RIL.md): pure functions, no models.

A group holds one question's G student outputs and G teacher outputs drawn from all K teachers:

    r_sim = 1[D(q, o) < threshold]   D = the discriminator's probability that o is the student's (disc.threshold:
                                     0.5, the spec's)
    r_ans = 1[judge says o is correct]
    r     = r_sim + r_ans
    A_i   = r_i - mean_j r_j         over the group's 2G outputs (Dr.GRPO: no division by the std)

Teacher outputs are ordinary group members, so a question whose G student samples are all wrong still
has non-zero advantages when a teacher is right: the zero-reward trap of plain GRPO is escaped.
RL only (no teachers): a group is the G student samples, r = r_ans, no discriminator.

Layout: the trainer judges and scores a whole batch at once, so per-output values travel as flat
tensors in group order: question 0's student outputs, then its teacher outputs, then question 1's,
... (``flatten`` lists the outputs in that order; ``build_groups`` cuts the flat tensors back).
"""

import random
from collections import Counter
from dataclasses import dataclass

import torch

from ril_fast.data import STUDENT  # the ``source`` of a student output; every other source is a teacher's name
from ril_fast.judge import Judge, JudgeItem


def similarity_rewards(disc_probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """r_sim = 1[D < threshold]: the output sounds like a teacher. disc_probs (n,) float -> (n,) float32."""
    return (disc_probs.detach() < threshold).float()


def answer_rewards(judge: Judge, teacher_judge: Judge, samples: list[dict], sources: list[str]) -> torch.Tensor:
    """r_ans = 1[judge says correct] for a batch's outputs -> (n,) float32 in {0, 1}, in the order of ``samples``
    (dicts with "question", "answer" and "response"; ``sources``: each one's, STUDENT or a teacher's name). The
    student's outputs go to ``judge`` in one call, the teachers' (if any) to ``teacher_judge`` in one call (the
    trainer's caches their verdicts, which never change)."""
    items = [JudgeItem(s["question"], s["answer"], s["response"]) for s in samples]
    student_idx = [i for i, s in enumerate(sources) if s == STUDENT]
    teacher_idx = [i for i, s in enumerate(sources) if s != STUDENT]
    r_ans = torch.zeros(len(items))
    r_ans[student_idx] = _verdicts(judge, [items[i] for i in student_idx])
    if teacher_idx:
        r_ans[teacher_idx] = _verdicts(teacher_judge, [items[i] for i in teacher_idx])
    return r_ans


def _verdicts(judge: Judge, items: list[JudgeItem]) -> torch.Tensor:
    """1[judge says correct] per item, one call of ``judge`` -> (n,) float32 in {0, 1}."""
    return torch.tensor([float(v) for v in judge(items)], dtype=torch.float32)


def draw_teacher_outputs(responses_by_teacher: dict[str, list[str]], G: int, rng: random.Random,
                         rotation: int | None = None) -> list[tuple[str, str]]:
    """G (teacher, response) pairs for one question, balanced over the teachers that have responses.

    With K such teachers each gets G // K outputs; the G % K left over go one each to the teachers
    from index ``rotation`` on (mod K, in dict order). Pass a running counter as ``rotation`` (e.g.
    the question's position in the epoch) so the extras rotate exactly; None draws the start from
    ``rng``. A teacher's share is drawn without replacement; only when it has fewer responses than
    its share are they reused, each as evenly as possible (whole shuffled passes, then a sample).
    The result is grouped by teacher, in dict order. Deterministic for a given ``rng`` state.
    """
    if G < 1:
        raise ValueError(f"G must be >= 1, got {G}")
    if STUDENT in responses_by_teacher:
        raise ValueError(f"a teacher may not be called {STUDENT!r}: that name marks student outputs")
    teachers = [name for name, responses in responses_by_teacher.items() if responses]
    if not teachers:
        raise ValueError("no teacher has a response for this question")
    K = len(teachers)
    start = rng.randrange(K) if rotation is None else rotation % K
    base, extra = divmod(G, K)
    drawn = []
    for k, name in enumerate(teachers):
        pool = responses_by_teacher[name]
        share = base + ((k - start) % K < extra)
        passes, rest = divmod(share, len(pool))
        picks = [r for _ in range(passes) for r in rng.sample(pool, len(pool))] + rng.sample(pool, rest)
        drawn += [(name, r) for r in picks]
    return drawn


@dataclass
class Group:
    """One question's outputs, student outputs first, with their rewards and advantages (all (n,))."""

    responses: list[str]
    source: list[str]  # STUDENT or the teacher's name
    r_ans: torch.Tensor  # float32 in {0, 1}
    r_sim: torch.Tensor | None  # float32 in {0, 1}; None in RL-only mode (no discriminator)
    rewards: torch.Tensor  # r_sim + r_ans (RL only: r_ans)
    advantages: torch.Tensor  # rewards - rewards.mean()

    @property
    def is_student(self) -> torch.Tensor:
        """(n,) bool: which outputs are the student's."""
        return torch.tensor([s == STUDENT for s in self.source], dtype=torch.bool)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO advantages of one group: A_i = r_i - mean_j r_j, no std division. (n,) -> (n,) float32."""
    rewards = rewards.float()
    return rewards - rewards.mean()


def flatten(student_responses: list[list[str]],
            teacher_outputs: list[list[tuple[str, str]]] | None = None) -> list[tuple[int, str, str]]:
    """Every output of a batch as (question index, source, response), in the flat group order."""
    teacher_outputs = teacher_outputs or [[] for _ in student_responses]
    return [(q, source, response)
            for q, (student, teacher) in enumerate(zip(student_responses, teacher_outputs, strict=True))
            for source, response in [(STUDENT, r) for r in student] + teacher]


def build_groups(student_responses: list[list[str]], teacher_outputs: list[list[tuple[str, str]]] | None,
                 r_ans: torch.Tensor, disc_probs: torch.Tensor | None = None, *,
                 threshold: float = 0.5) -> list[Group]:
    """Cut a batch's flat per-output values into groups and compute rewards and advantages.

    student_responses: B lists of student outputs; teacher_outputs: B lists of (teacher, response),
    or None for RL only. r_ans (N,) and disc_probs (N,) (D, the probability of "student") follow the
    ``flatten`` order, N = all outputs. RIL needs disc_probs; RL only must not have it.
    Returned tensors are float32 on the CPU.
    """
    rl_only = not teacher_outputs or not any(teacher_outputs)
    if rl_only != (disc_probs is None):
        raise ValueError("RIL (teacher outputs) needs disc_probs; RL only (no teachers) takes none")
    outputs = flatten(student_responses, teacher_outputs)
    for what, values in (("r_ans", r_ans), ("disc_probs", disc_probs)):
        if values is not None and values.shape != (len(outputs),):
            raise ValueError(f"{what} has shape {tuple(values.shape)}, expected ({len(outputs)},): "
                             "one per output")
    counts = Counter(q for q, _, _ in outputs)
    sizes = [counts[q] for q in range(len(student_responses))]
    r_ans = r_ans.detach().float().cpu()
    r_sim = None if disc_probs is None else similarity_rewards(disc_probs.cpu(), threshold)
    groups, start = [], 0
    for q, size in enumerate(sizes):
        ans, sim = r_ans[start:start + size], None if r_sim is None else r_sim[start:start + size]
        rewards = ans if sim is None else sim + ans
        groups.append(Group(responses=[o[2] for o in outputs[start:start + size]],
                            source=[o[1] for o in outputs[start:start + size]],
                            r_ans=ans, r_sim=sim, rewards=rewards, advantages=group_advantages(rewards)))
        start += size
    return groups


def reward_stats(groups: list[Group], answer_types: list[str | None] | None = None) -> dict[str, float]:
    """Step-log statistics: mean answer / similarity rewards of student and of teacher outputs, the
    fraction of groups whose advantages are all zero ("dead": no learning signal), and mean |A|.
    A key with no outputs behind it (RL only: similarity and teacher keys) is left out.
    With teachers, ``teacher_advantage`` is the mean advantage of the teacher outputs: how hard the
    step pulls the student towards the teachers' text (a group's advantages sum to 0, so the student
    outputs' mean is minus this when the group has G of each).
    ``answer_types``: each group's question type (None: untyped); typed ones add
    ``student_answer_reward/<type>``, the student's training accuracy per type, and with teachers
    ``teacher_advantage/<type>``."""
    if not groups:
        return {}
    stats = {}
    for who, want in (("student", True), ("teacher", False)):
        for reward, attr in (("answer", "r_ans"), ("similarity", "r_sim")):
            values = [getattr(g, attr)[g.is_student == want] for g in groups if getattr(g, attr) is not None]
            values = torch.cat(values) if values else torch.empty(0)
            if values.numel():
                stats[f"{who}_{reward}_reward"] = values.mean().item()
    teacher_advantages = [g.advantages[~g.is_student] for g in groups]
    if any(a.numel() for a in teacher_advantages):
        stats["teacher_advantage"] = torch.cat(teacher_advantages).mean().item()
    for kind in sorted({t for t in answer_types or () if t is not None}):
        mine = [(g, a) for g, a, t in zip(groups, teacher_advantages, answer_types, strict=True) if t == kind]
        stats[f"student_answer_reward/{kind}"] = torch.cat([g.r_ans[g.is_student] for g, _ in mine]).mean().item()
        teacher = torch.cat([a for _, a in mine])
        if teacher.numel():
            stats[f"teacher_advantage/{kind}"] = teacher.mean().item()
    stats["dead_group_fraction"] = sum(bool((g.advantages == 0).all()) for g in groups) / len(groups)
    stats["mean_abs_advantage"] = torch.cat([g.advantages for g in groups]).abs().mean().item()
    return stats
