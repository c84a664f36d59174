"""RIL rewards, teacher-guided groups, Dr.GRPO advantages and balanced teacher draws."""

import random
from collections import Counter

import pytest
import torch

from ril_fast.judge import RuleJudge
from ril_fast.rewards import (STUDENT, answer_rewards, build_groups, draw_teacher_outputs, flatten,
                              group_advantages, reward_stats, similarity_rewards)


def test_similarity_rewards_threshold():
    probs = torch.tensor([0.1, 0.5, 0.49, 0.9, 0.0, 1.0])
    assert similarity_rewards(probs).tolist() == [1, 0, 1, 0, 1, 0]  # D = 0.5 is not "teacher"
    assert similarity_rewards(probs, threshold=0.95).tolist() == [1, 1, 1, 1, 1, 0]
    assert similarity_rewards(probs).dtype == torch.float32


def test_answer_rewards_from_judge():
    """The student's outputs go to the judge in one call, the teachers' to the teacher judge in one call (the
    trainer's caches their verdicts); the rewards come back in the outputs' order."""
    samples = [{"question": "What shape is this?", "answer": "triangle", "response": r}
               for r in ("A triangle.", "circle", "Not a triangle.", "The shape is a triangle.", "triangle")]
    sources = [STUDENT, STUDENT, "big", STUDENT, "huge"]
    rule, calls = RuleJudge(use_math_verify=False), []

    def judge(name):
        return lambda items: calls.append((name, [i.response for i in items])) or rule(items)

    r = answer_rewards(judge("student"), judge("teacher"), samples, sources)
    assert r.dtype == torch.float32 and r.tolist() == [1, 0, 0, 1, 1]
    assert calls == [("student", ["A triangle.", "circle", "The shape is a triangle."]),
                     ("teacher", ["Not a triangle.", "triangle"])]
    calls.clear()  # RL only: no teacher output, the teacher judge is not called
    assert answer_rewards(judge("student"), judge("teacher"), samples[:2], sources[:2]).tolist() == [1, 0]
    assert [name for name, _ in calls] == ["student"]


def test_group_advantages_by_hand():
    assert torch.allclose(group_advantages(torch.tensor([1.0, 0, 0, 1, 2, 0])),
                          torch.tensor([1 / 3, -2 / 3, -2 / 3, 1 / 3, 4 / 3, -2 / 3]))
    assert group_advantages(torch.tensor([2, 2, 2])).tolist() == [0, 0, 0]  # ints in, float out
    assert group_advantages(torch.tensor([0.0, 1.0])).tolist() == [-0.5, 0.5]  # no std division


def test_group_advantages_random_against_float64():
    rewards = torch.randint(0, 3, (17,)).float()
    a = group_advantages(rewards)
    assert torch.allclose(a.double(), rewards.double() - rewards.double().mean(), atol=1e-6)
    assert abs(a.sum().item()) < 1e-5


def test_build_groups_by_hand():
    """Two questions, G = 2, one teacher. Values follow flatten order: q0 student, q0 teacher, q1 ..."""
    students = [["s1", "s2"], ["s3", "s4"]]
    teachers = [[("T", "t1"), ("T", "t2")], [("T", "t3"), ("T", "t4")]]
    assert [o[2] for o in flatten(students, teachers)] == ["s1", "s2", "t1", "t2", "s3", "s4", "t3", "t4"]
    r_ans = torch.tensor([1.0, 0, 1, 1, 0, 0, 0, 1])
    disc = torch.tensor([0.9, 0.3, 0.2, 0.7, 0.6, 0.6, 0.1, 0.1])
    g0, g1 = build_groups(students, teachers, r_ans, disc)
    assert g0.responses == ["s1", "s2", "t1", "t2"] and g0.source == [STUDENT, STUDENT, "T", "T"]
    assert g0.r_sim.tolist() == [0, 1, 1, 0]
    assert g0.rewards.tolist() == [1, 1, 2, 1]
    assert g0.advantages.tolist() == [-0.25, -0.25, 0.75, -0.25]  # mean 1.25
    assert g1.responses == ["s3", "s4", "t3", "t4"]
    assert g1.rewards.tolist() == [0, 0, 1, 2]
    assert g1.advantages.tolist() == [-0.75, -0.75, 0.25, 1.25]  # mean 0.75
    assert g1.is_student.tolist() == [True, True, False, False]


def test_zero_reward_trap_is_escaped():
    """All G student samples wrong, teachers right: the group still teaches (RIL), RL only does not."""
    G, answer = 4, "triangle"
    students = [["circle", "It is a square.", "red", "Not a triangle."]]
    rng = random.Random(0)
    teachers = [draw_teacher_outputs({"big": ["The shape is a triangle.", "Triangle."],
                                      "huge": ["It's a triangle."]}, G, rng)]
    judge = RuleJudge(use_math_verify=False)
    outputs = flatten(students, teachers)
    samples = [{"question": "What shape is in the image?", "answer": answer, "response": r} for _, _, r in outputs]
    r_ans = answer_rewards(judge, judge, samples, [source for _, source, _ in outputs])
    assert r_ans.tolist() == [0] * G + [1] * G
    for disc in (torch.full((2 * G,), 0.9),  # D sure everything is the student's
                 torch.tensor([0.9] * G + [0.1] * G)):  # D separates perfectly
        (group,) = build_groups(students, teachers, r_ans, disc)
        assert (group.advantages[:G] < 0).all() and (group.advantages[G:] > 0).all()
    assert group.advantages.tolist() == [-1] * G + [1] * G  # rewards 0 vs 2, mean 1
    (rl,) = build_groups(students, None, r_ans[:G])
    assert rl.advantages.tolist() == [0] * G and rl.r_sim is None
    stats = reward_stats([rl])
    assert stats["dead_group_fraction"] == 1.0 and stats["mean_abs_advantage"] == 0.0


def test_rl_only_groups():
    students = [["a", "b", "c"], ["d", "e", "f"]]
    (g0, g1) = build_groups(students, None, torch.tensor([1.0, 0, 0, 1, 1, 1]))
    assert torch.allclose(g0.advantages, torch.tensor([2 / 3, -1 / 3, -1 / 3]))
    assert g1.advantages.tolist() == [0, 0, 0]
    assert g0.source == [STUDENT] * 3 and g0.rewards.tolist() == [1, 0, 0]
    assert build_groups(students, [[], []], torch.zeros(6))[0].r_sim is None  # no teacher outputs = RL only


def test_build_groups_rejects_mismatches():
    students, teachers = [["a", "b"]], [[("T", "x"), ("T", "y")]]
    with pytest.raises(ValueError, match="disc_probs"):
        build_groups(students, teachers, torch.zeros(4))
    with pytest.raises(ValueError, match="disc_probs"):
        build_groups(students, None, torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="one per output"):
        build_groups(students, teachers, torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError):
        build_groups(students, teachers + teachers, torch.zeros(4), torch.zeros(4))


def test_reward_stats_by_hand():
    students = [["s1", "s2"], ["s3", "s4"]]
    teachers = [[("T", "t1"), ("U", "t2")], [("T", "t3"), ("U", "t4")]]
    r_ans = torch.tensor([1.0, 0, 1, 1, 0, 0, 0, 1])
    disc = torch.tensor([0.9, 0.3, 0.2, 0.7, 0.9, 0.9, 0.9, 0.9])
    stats = reward_stats(build_groups(students, teachers, r_ans, disc))
    # q0 rewards [1, 1, 2, 1] -> A [-.25, -.25, .75, -.25]
    # q1 rewards [0, 0, 0, 1] -> A [-.25, -.25, -.25, .75]
    assert stats == pytest.approx({
        "student_answer_reward": 1 / 4, "student_similarity_reward": 1 / 4,
        "teacher_answer_reward": 3 / 4, "teacher_similarity_reward": 1 / 4,
        "teacher_advantage": 0.25, "dead_group_fraction": 0.0, "mean_abs_advantage": 0.375})
    rl = reward_stats(build_groups(students, None, torch.tensor([1.0, 1, 0, 0])))
    assert rl == {"student_answer_reward": 0.5, "dead_group_fraction": 1.0, "mean_abs_advantage": 0.0}
    typed = reward_stats(build_groups(students, teachers, r_ans, disc), ["shape", "color"])
    assert typed["student_answer_reward/shape"] == 0.5 and typed["student_answer_reward/color"] == 0.0  # q0, q1
    assert typed["teacher_advantage/shape"] == 0.25 and typed["teacher_advantage/color"] == 0.25  # (.75-.25)/2 each
    # A third question whose teachers are both wrong and whose students are both right pulls away from them.
    three = build_groups(students + [["s5", "s6"]], teachers + [[("T", "t5"), ("U", "t6")]],
                         torch.cat([r_ans, torch.tensor([1.0, 1, 0, 0])]), torch.cat([disc, torch.full((4,), 0.9)]))
    typed = reward_stats(three, ["shape", "color", "color"])
    assert typed["teacher_advantage/color"] == pytest.approx((0.25 - 0.5) / 2)
    assert typed["teacher_advantage/shape"] == 0.25
    assert typed["teacher_advantage"] == pytest.approx((0.25 + 0.25 - 0.5) / 3)
    untyped = reward_stats(build_groups(students, teachers, r_ans, disc), [None, None])
    assert "student_answer_reward/shape" not in untyped
    assert reward_stats([]) == {}



def test_dead_group_fraction_counts_groups_whose_advantages_are_all_zero():
    """A group with some zero advantages still teaches: only one whose every advantage is 0 is dead."""
    students = [["s1", "s2"], ["s3", "s4"], ["s5", "s6"]]
    teachers = [[("T", "t1"), ("U", "t2")], [("T", "t3"), ("U", "t4")], [("T", "t5"), ("U", "t6")]]
    r_ans = torch.tensor([0.0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0])
    disc = torch.tensor([0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9])
    groups = build_groups(students, teachers, r_ans, disc)
    # rewards [0, 1, 2, 1] -> A [-1, 0, 1, 0]: two zeros, not dead; [2, 2, 2, 2] -> all 0: dead;
    # [1, 0, 0, 0] -> A [.75, -.25, -.25, -.25]: no zero
    assert [g.advantages.tolist() for g in groups] == [[-1, 0, 1, 0], [0, 0, 0, 0], [0.75, -0.25, -0.25, -0.25]]
    assert reward_stats(groups)["dead_group_fraction"] == pytest.approx(1 / 3)


POOLS = {name: [f"{name}-{i}" for i in range(10)] for name in ("A", "B", "C")}
# (K, G) -> outputs per teacher with rotation 0: G // K each, the remainder to the first teachers.
BALANCE = {(1, 4): [4], (1, 5): [5], (2, 4): [2, 2], (2, 5): [3, 2], (3, 4): [2, 1, 1], (3, 5): [2, 2, 1]}


@pytest.mark.parametrize("K,G", sorted(BALANCE))
def test_teacher_balance_exact(K, G):
    pools = {name: POOLS[name] for name in "ABC"[:K]}
    rng = random.Random(7)
    drawn = draw_teacher_outputs(pools, G, rng, rotation=0)
    counts = Counter(name for name, _ in drawn)
    assert [counts[name] for name in pools] == BALANCE[K, G]
    assert all(r in pools[name] for name, r in drawn)
    assert len(set(drawn)) == G  # plenty of responses: no repeats
    # Rotating the start spreads the remainder: over K consecutive questions every teacher gets G.
    totals = Counter(name for q in range(K) for name, _ in draw_teacher_outputs(pools, G, rng, rotation=q))
    assert set(totals.values()) == {G}
    shifted = Counter(name for name, _ in draw_teacher_outputs(pools, G, rng, rotation=1))
    assert [shifted[name] for name in pools] == BALANCE[K, G][-1:] + BALANCE[K, G][:-1]


def test_replacement_only_when_needed():
    rng = random.Random(3)
    exact = draw_teacher_outputs({"A": ["a1", "a2"], "B": ["b1", "b2"]}, 4, rng)
    assert sorted(r for _, r in exact) == ["a1", "a2", "b1", "b2"]  # share == pool: each exactly once
    short = draw_teacher_outputs({"A": ["a1"], "B": ["b1", "b2", "b3"]}, 6, rng)
    uses = Counter(r for _, r in short)
    assert uses["a1"] == 3 and all(uses[b] == 1 for b in ("b1", "b2", "b3"))
    uneven = Counter(r for _, r in draw_teacher_outputs({"A": ["a1", "a2"]}, 5, rng))
    assert sorted(uneven.values()) == [2, 3]  # reused as evenly as possible


def test_a_share_smaller_than_the_pool_never_repeats(_fresh_seed):
    """A teacher's share drawn from a larger pool is drawn without replacement, and a share past the pool takes
    whole passes before any response a further time: over many draws no response is used twice within a pass's
    worth (a draw with replacement repeats one in ~80% of the draws of 4 from 5)."""
    rng = random.Random(_fresh_seed)  # RIL_TEST_SEED replays the draws
    pools = {"A": [f"a{i}" for i in range(5)], "B": [f"b{i}" for i in range(3)]}
    for _ in range(100):
        drawn = draw_teacher_outputs({"A": pools["A"]}, 4, rng)  # share 4 of 5: the rest, sampled
        assert len(set(drawn)) == 4
        uses = Counter(r for _, r in draw_teacher_outputs(pools, 10, rng))  # shares 5 + 5: one pass of A, 1 of B + 2
        assert all(uses[a] == 1 for a in pools["A"]) and sorted(uses[b] for b in pools["B"]) == [1, 2, 2]


def test_teacher_draws_deterministic():
    pools = {name: POOLS[name] for name in "AB"}
    runs = [[draw_teacher_outputs(pools, 5, rng) for _ in range(4)]
            for rng in (random.Random(11), random.Random(11))]
    assert runs[0] == runs[1]
    assert runs[0] != [draw_teacher_outputs(pools, 5, random.Random(12)) for _ in range(4)]


def test_teacher_draw_edge_cases():
    rng = random.Random(0)
    drawn = draw_teacher_outputs({"A": ["a"], "B": []}, 3, rng)  # B has nothing for this question
    assert drawn == [("A", "a")] * 3
    with pytest.raises(ValueError, match="no teacher"):
        draw_teacher_outputs({"A": [], "B": []}, 3, rng)
    with pytest.raises(ValueError, match="student"):
        draw_teacher_outputs({STUDENT: ["x"]}, 2, rng)
    with pytest.raises(ValueError):
        draw_teacher_outputs({"A": ["a"]}, 0, rng)
