"""FlowOPDTrainer: the per-step KL against a hand formula, routing, the teacher's conditioning, the modes, MAR, the
merge cold start and the errors."""

import dataclasses
import math

import pytest
import torch
from helpers import MODEL, TINY_RUN
from peft import LoraConfig

from flow_trl import (
    DanceGRPOConfig,
    DanceGRPOTrainer,
    FlowNFTConfig,
    FlowNFTTrainer,
    FlowOPDConfig,
    FlowOPDTrainer,
    ManifoldAnchorMixin,
)
from flow_trl.lora import read_lora
from flow_trl.toy import shapes_dataset
from flow_trl.trainer.base_config import ManifoldAnchorArguments
from flow_trl.trainer.opd_trainer import constant_group_mask, opd_advantages
from flow_trl.trainer.transitions import transition_kl


TINY = dict(TINY_RUN, timestep_fraction=1.0)
LORA = dict(r=4, lora_alpha=8)


def dataset():
    """Two task families, routed by the `tag` column."""
    return shapes_dataset("train").filter(lambda r: r["tag"] in ("counting", "colors"))


def rows(tags=("counting", "counting", "colors", "colors")):
    data = dataset()
    by_tag = {tag: next(r for r in data if r["tag"] == tag) for tag in set(tags)}
    return [by_tag[tag] for tag in tags]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two different random teacher LoRAs, saved by a flow_trl trainer (diffusers format)."""
    root = tmp_path_factory.mktemp("teachers")
    trainer = DanceGRPOTrainer(
        MODEL,
        args=DanceGRPOConfig(output_dir=str(root / "t"), **TINY),
        reward_funcs="shapes",
        train_dataset=dataset(),
        peft_config=LoraConfig(**LORA),
    )
    paths = {}
    for seed, task in enumerate(("counting", "colors")):
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for name, param in trainer.transformer.named_parameters():
                if ".default." in name and "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.05)
        trainer.save_model(str(root / task))
        paths[task] = str(root / task)
    return paths


def opd(tmp_path, teachers, **overrides):
    args = FlowOPDConfig(output_dir=str(tmp_path / "opd"), task_column="tag", **{**TINY, **overrides})
    return FlowOPDTrainer(
        MODEL,
        args=args,
        reward_funcs="shapes",
        train_dataset=dataset(),
        peft_config=LoraConfig(**LORA),
        teachers=teachers,
    )


def test_per_step_kl_matches_the_flow_sde_hand_formula(tmp_path, teachers):
    trainer = opd(tmp_path, teachers, mar_coef=0.0)
    inputs = trainer._generate_and_score(rows())
    captured = {}

    def spy(inputs, transition):
        captured["t"] = transition
        return trainer.__class__._transition_loss(trainer, inputs, transition)

    trainer._transition_loss = spy
    trainer._compute_loss(trainer.model, inputs, 0)
    t = captured["t"]
    v_teacher = trainer.teacher_velocity(t.latents, t.sigma, t.cond, inputs["teacher_ids"])
    student_v = t.velocity.detach().requires_grad_(True)
    out = trainer.replay_step(t.latents, student_v, t.sigma, t.sigma_next, t.next_latents)
    kl = transition_kl(type(t)(**{**vars(t), "velocity": student_v, "out": out}), v_teacher)
    # by hand (Flow-GRPO's SDE, eta 0.7): mu = x (1 + s^2 dt / 2 sigma) + v (1 + s^2 (1 - sigma) / 2 sigma) dt with
    # s = eta sqrt(sigma / (1 - sigma)), std^2 = s^2 (-dt), KL = mean (mu_s - mu_t)^2 / (2 s^2)
    eta = trainer.args.noise_level
    for b in range(len(kl)):
        sigma, sigma_next = t.sigma[b].item(), t.sigma_next[b].item()
        dt = sigma_next - sigma
        s2 = eta**2 * sigma / (1 - (sigma if sigma < 1 else float(trainer.sigmas[1])))
        coef = (1 + s2 * (1 - sigma) / (2 * sigma)) * dt
        expected = ((student_v[b] - v_teacher[b]) * coef).pow(2).mean() / (2 * s2)
        assert kl[b].item() == pytest.approx(expected.item(), rel=1e-4)
    assert kl.min() > 0  # two different networks
    kl.sum().backward()  # gradient reaches the student's velocity only (the teacher's is a constant)
    expected_grad = (student_v - v_teacher).detach() * coef**2 / s2 / student_v[0].numel()
    torch.testing.assert_close(student_v.grad[-1], expected_grad[-1], rtol=1e-4, atol=1e-10)
    assert not v_teacher.requires_grad


def test_routing_sends_each_sample_to_its_teacher(tmp_path, teachers):
    trainer = opd(tmp_path, teachers)
    inputs = trainer._generate_and_score(rows(("colors", "colors", "counting", "counting")))
    names = {task: trainer.teacher_adapters[i] for task, i in trainer._teacher_of_task.items()}
    assert inputs["teacher_ids"].tolist() == [trainer._teacher_of_task[t] for t in ("colors",) * 2 + ("counting",) * 2]
    x, cond = inputs["latents_before"][:, 1], inputs["cond"]
    sigma = trainer.sigmas[inputs["step_indices"][:, 1]]
    routed = trainer.teacher_velocity(x, sigma, cond, inputs["teacher_ids"])
    with torch.no_grad():
        for task, rows_of_task in (("colors", [0, 1]), ("counting", [2, 3])):
            with trainer.policy(names[task]) as teacher:
                alone = trainer.velocity(teacher, x, sigma, cond)
            torch.testing.assert_close(routed[rows_of_task], alone[rows_of_task])
        with trainer.policy(names["counting"]) as other:
            assert not torch.allclose(routed[:2], trainer.velocity(other, x, sigma, cond)[:2])


def test_the_teacher_sees_the_students_exact_conditioning(tmp_path, teachers):
    trainer = opd(tmp_path, teachers, guidance_scale=2.0, mar_coef=0.0, diagnostics_every_log=False)
    inputs = trainer._generate_and_score(rows())
    calls = []
    velocity = trainer.adapter.velocity

    def spy(module, latents, sigma, cond, guidance_scale, negative_cond):
        active = module.active_adapters() if hasattr(module, "active_adapters") else None
        calls.append((active, latents, sigma, cond, guidance_scale, negative_cond))
        return velocity(module, latents, sigma, cond, guidance_scale, negative_cond)

    trainer.adapter.velocity = spy
    trainer._compute_loss(trainer.model, inputs, 0)
    (student, *teacher_calls) = calls
    assert student[0] == ["default"] and len(teacher_calls) == 2
    seen = set()
    for active, latents, sigma, cond, scale, negative in teacher_calls:
        idx = (inputs["teacher_ids"] == trainer.teacher_adapters.index(active[0])).nonzero().squeeze(1)
        seen.update(idx.tolist())
        assert scale == 2.0 and negative is trainer._negative_cond is not None
        torch.testing.assert_close(latents, student[1][idx], rtol=0, atol=0)
        torch.testing.assert_close(sigma, student[2][idx], rtol=0, atol=0)
        for key, value in cond.items():
            torch.testing.assert_close(value, student[3][key][idx], rtol=0, atol=0)
    assert seen == {0, 1, 2, 3}


def test_modes_on_the_first_replay(tmp_path, teachers):
    kl = torch.tensor([0.5, 2.0, 7.0], requires_grad=True)
    advantages = opd_advantages(kl, "kl_only", 1.0, clip=5.0)
    torch.testing.assert_close(advantages, torch.tensor([-0.5, -2.0, -5.0]))
    advantages.sum().backward()
    assert kl.grad.tolist() == [-1.0, -1.0, 0.0]  # not detached; clipped samples get none (as the reference)
    mixed = opd_advantages(torch.tensor([0.5, 2.0]), "mixed", 2.0, torch.tensor([1.0, -1.0]), clip=None)
    torch.testing.assert_close(mixed, torch.tensor([0.0, -5.0]))
    # ratio 1 on the first replay: kl_only's PPO loss is mean(KL) (A = -KL), gkd's is mean(KL) too
    losses = {}
    for mode in ("kl_only", "gkd"):
        trainer = opd(tmp_path / mode, teachers, opd_mode=mode, mar_coef=0.0, diagnostics_every_log=False)
        inputs = trainer._generate_and_score(rows())
        losses[mode] = trainer._compute_loss(trainer.model, inputs, 0).item()
        logged = trainer._metrics["train"]
        assert losses[mode] == pytest.approx(float(logged["opd/teacher_kl"][-1]), rel=1e-5)
    assert logged.get("ratio") is None  # gkd has no ratio
    assert losses["kl_only"] > 0


def test_constant_reward_groups_are_masked():
    mask = constant_group_mask(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2)
    assert mask.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_mar_is_zero_when_the_student_is_the_anchor(tmp_path, teachers):
    # a fresh LoRA (B = 0) is the base model, the default anchor
    trainer = opd(tmp_path / "base", teachers, mar_coef=1.0)
    inputs = trainer._generate_and_score(rows())
    trainer._compute_loss(trainer.model, inputs, 0)
    assert trainer._metrics["train"]["mar/kl"] == [0.0]
    # a LoRA anchor: zero when the student starts from the same LoRA, positive from another
    for init, is_zero in ((teachers["colors"], True), (teachers["counting"], False)):
        trainer = opd(tmp_path / "lora", teachers, mar_coef=1.0, mar_adapter=teachers["colors"], init_adapter=init)
        trainer._compute_loss(trainer.model, trainer._generate_and_score(rows()), 0)
        assert (trainer._metrics["train"]["mar/kl"][0] < 1e-12) == is_zero


def test_mar_composes_with_a_velocity_trainer(tmp_path):
    class MARNFTTrainer(ManifoldAnchorMixin, FlowNFTTrainer):
        pass

    @dataclasses.dataclass
    class MARNFTConfig(ManifoldAnchorArguments, FlowNFTConfig):
        pass

    kwargs = {k: v for k, v in TINY.items() if k != "timestep_fraction"}
    args = MARNFTConfig(output_dir=str(tmp_path / "nft"), mar_coef=0.5, **kwargs)
    with pytest.raises(ValueError, match="ManifoldAnchorMixin"):
        FlowNFTTrainer(MODEL, args=args, reward_funcs="shapes", train_dataset=dataset(), peft_config=LoraConfig(r=4))
    trainer = MARNFTTrainer(
        MODEL, args=args, reward_funcs="shapes", train_dataset=dataset(), peft_config=LoraConfig(r=4)
    )
    trainer.train()
    assert any("mar/kl" in entry for entry in trainer.state.log_history)


def test_merge_cold_start_then_training_moves_only_the_student(tmp_path, teachers):
    trainer = opd(tmp_path, teachers, cold_start="merge", max_steps=2)
    student = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if ".default." in n}
    a, b = (read_lora(teachers[t])[0] for t in ("counting", "colors"))
    key = next(k for k in a if "lora_B" in k)
    param = key.removeprefix("transformer.").replace(".lora_B.weight", ".lora_B.default.weight")
    torch.testing.assert_close(student[param], (a[key] + b[key]) / 2)
    frozen = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if ".teacher_" in n}
    trainer.train()
    params = dict(trainer.transformer.named_parameters())
    assert any(not torch.equal(student[n], params[n]) for n in student)
    assert all(torch.equal(frozen[n], params[n]) for n in frozen)
    first = next(e for e in trainer.state.log_history if "ratio" in e)
    assert math.isclose(first["ratio"], 1.0, abs_tol=1e-5)
    assert {"opd/teacher_kl", "mar/kl", "rewards/shapes/mean"} <= set(first)


def test_merge_deltas_cold_start_is_the_best_approximation_of_the_teachers_soup(tmp_path, teachers):
    trainer = opd(tmp_path, teachers, cold_start="merge_deltas")
    params = dict(trainer.transformer.named_parameters())
    a, b = (read_lora(teachers[t])[0] for t in ("counting", "colors"))
    scale = LORA["lora_alpha"] / LORA["r"]
    for key in [k for k in a if "lora_B" in k][:3]:
        module = key.removeprefix("transformer.").removesuffix(".lora_B.weight")
        key_a = key.replace("lora_B", "lora_A")
        soup = scale * (a[key] @ a[key_a] + b[key] @ b[key_a]).double() / 2  # the mean of the two weight changes
        student = scale * params[f"{module}.lora_B.default.weight"] @ params[f"{module}.lora_A.default.weight"]
        u, s, vh = torch.linalg.svd(soup)
        best = (u[:, : LORA["r"]] * s[: LORA["r"]]) @ vh[: LORA["r"]]  # rank 4 of a rank-8 mean: Eckart-Young
        torch.testing.assert_close(student.double(), best, rtol=1e-4, atol=1e-6)


def test_clear_errors(tmp_path, teachers):
    with pytest.raises(ValueError, match="needs teachers"):
        opd(tmp_path, None)
    with pytest.raises(ValueError, match=r"No teacher for the 'tag' values \['colors'\]"):
        opd(tmp_path, {"counting": teachers["counting"]})
    with pytest.raises(ValueError, match="no 'task' column"):
        FlowOPDTrainer(
            MODEL,
            args=FlowOPDConfig(output_dir=str(tmp_path), **TINY),
            reward_funcs="shapes",
            train_dataset=dataset(),
            peft_config=LoraConfig(**LORA),
            teachers=teachers,
        )
    with pytest.raises(ValueError, match="rank or base model"):
        FlowOPDTrainer(
            MODEL,
            args=FlowOPDConfig(output_dir=str(tmp_path), task_column="tag", **TINY),
            reward_funcs="shapes",
            train_dataset=dataset(),
            peft_config=LoraConfig(r=8, lora_alpha=8),
            teachers=teachers,
        )
    with pytest.raises(ValueError, match="peft_config"):
        FlowOPDTrainer(
            MODEL,
            args=FlowOPDConfig(output_dir=str(tmp_path), task_column="tag", **TINY),
            reward_funcs="shapes",
            train_dataset=dataset(),
            teachers=teachers,
        )
    with pytest.raises(ValueError, match="task=path"):
        FlowOPDConfig(output_dir=str(tmp_path), teachers=["counting:path"])
    with pytest.raises(ValueError, match="opd_mode"):
        FlowOPDConfig(output_dir=str(tmp_path), opd_mode="forward_kl")
    for cold_start in ("merge", "merge_deltas"):
        with pytest.raises(ValueError, match="either"):
            FlowOPDConfig(output_dir=str(tmp_path), cold_start=cold_start, init_adapter="x")


def test_shapes_command_without_teachers_says_how_to_train_them(tmp_path, capsys):
    from flow_trl.scripts.opd import cli

    with pytest.raises(SystemExit) as exit_info:
        cli(["--output_dir", str(tmp_path), "--train_teachers", "false"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("flow-trl: error: No shapes-world teacher") and "--teacher_dir" in error
