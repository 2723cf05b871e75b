"""bf16 runs, as every real-size run is: a bf16 pipeline trained with `bf16=True` on CPU keeps the step math in fp32,
samples and replays to the same bits (ratio exactly 1 on the first replay) and updates the LoRA."""

import torch
from helpers import redness, tiny_config, tiny_lora, train_prompts

from flow_trl import DanceGRPOConfig, DanceGRPOTrainer
from flow_trl.toy import load_shapes_pipeline


def test_a_bf16_pipeline_trains_with_fp32_step_math_and_ratio_one(tmp_path):
    pipe = load_shapes_pipeline(torch_dtype=torch.bfloat16)
    args = tiny_config(DanceGRPOConfig, tmp_path, bf16=True, use_cpu=True, timestep_fraction=1.0, learning_rate=1e-2)
    trainer = DanceGRPOTrainer(pipe, args=args, reward_funcs=redness, train_dataset=train_prompts(8),
                               peft_config=tiny_lora())
    assert trainer.compute_dtype == torch.bfloat16
    inputs = trainer._generate_and_score(list(train_prompts(8).select([0, 0, 1, 1])))
    assert inputs["latents"].dtype == torch.bfloat16  # stored in the storage dtype...
    assert inputs["log_probs"].dtype == torch.float32 and torch.isfinite(inputs["log_probs"]).all()  # ...math in fp32
    for chunk in range(trainer._num_loss_chunks(inputs)):
        loss = trainer._compute_loss(trainer.model, inputs, chunk)
        assert torch.isfinite(loss)
    assert trainer._metrics["train"]["ratio"] and all(r == 1.0 for r in trainer._metrics["train"]["ratio"])
    trainer._metrics["train"].clear()
    lora_b = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if "lora_B" in n}
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["ratio"] == 1.0 and logged["grad_norm"] > 0
    assert any(not torch.equal(lora_b[n], p) for n, p in trainer.transformer.named_parameters() if n in lora_b)
