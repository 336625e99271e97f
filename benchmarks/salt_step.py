"""SALT training step (teacher forward + chunked NTP+KD loss) / plain next-token training step.

    python -m benchmarks.salt_step [--threads 1] [--vocab 4096]

Target: ratio <= 1.3. One step = forward, loss, backward and AdamW update of the student on a ``[16, 128]``
batch: the default recipe's student (GPT-2 config 4 x 256) and teacher (1 x 128, the small model of the default
pair), vocabulary 4096. Three steps alternate (``benchmarks._common.interleaved_ratios``; median per-alternation
ratio with min-max): ``ntp`` (``CausalLM``'s
cross-entropy), ``salt_kd`` (stage 1: teacher forward under inference_mode + :func:`salt_loss`) and
``salt_ntp`` (stage 2: :func:`salt_loss` without a teacher, i.e. the fused chunked cross-entropy). Writes docs/results/benchmarks/salt_step.json.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._common import Run, interleaved_ratios, target_row
from lit_cascades.functional.distillation import salt_loss
from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config
from lit_cascades.modules.causal_lm import CausalLM, shifted_logits_and_labels
from lit_cascades.modules.salt import aligned_targets, full_logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--alternations", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Run("salt_step")
    torch.manual_seed(0)
    student = build_causal_lm(gpt2_config(args.vocab, n_layer=4, n_embd=256, n_head=4, n_positions=256))
    teacher = build_causal_lm(gpt2_config(args.vocab, n_layer=1, n_embd=128, n_head=4, n_positions=256)).eval()
    teacher.requires_grad_(False)
    batch = {"input_ids": torch.randint(0, args.vocab, (16, 128), generator=torch.Generator().manual_seed(0))}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    module = CausalLM(student)
    target = aligned_targets(batch)

    def update(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def ntp() -> None:
        logits, labels = shifted_logits_and_labels(student, batch)
        update(module.compute_loss(logits, labels)[0])

    def salt_kd() -> None:
        with torch.inference_mode():
            teacher_logits = full_logits(teacher, batch)
        update(salt_loss(full_logits(student, batch), teacher_logits, target, 0.5).loss)

    def salt_ntp() -> None:
        update(salt_loss(full_logits(student, batch), None, target, 0.0).loss)

    out = interleaved_ratios({"ntp": ntp, "salt_kd": salt_kd, "salt_ntp": salt_ntp}, baseline="ntp",
                             alternations=args.alternations, warmup=2)
    run.write({"setting": {**vars(args), "batch": [16, 128], "student": "4x256", "teacher": "1x128"}, **out},
              [target_row("SALT KD step / next-token step", 1.3, out["ratios"]["salt_kd"])])

if __name__ == "__main__":
    main()
