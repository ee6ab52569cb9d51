"""`make demo`: the Align-TI losses on random tensors (placeholder until the trainer demo lands).

Shows every part of Eq. 8 on a small random batch: candidates sampled from the student,
the TPA expansion with its ribbon mask, and the loss parts.
"""

from __future__ import annotations

import argparse

import torch

import tokinteract as ti


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="larger shapes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    B, T, V, d = (4, 64, 512, 4) if args.full else (2, 12, 50, 2)
    input_ids = torch.randint(0, V, (B, T))
    attention_mask = torch.ones(B, T, dtype=torch.bool)
    attention_mask[1, :3] = False  # left padding in row 1
    labels = input_ids.masked_fill(~attention_mask, -100)
    labels[:, : T // 2] = -100  # the first half is the prompt
    visual = torch.zeros(B, T, dtype=torch.bool)
    visual[:, 1 : T // 4] = True
    visual &= attention_mask
    instruction = torch.zeros(B, T, dtype=torch.bool)
    instruction[:, T // 4 : T // 2] = True

    cand_mask = ti.shift_labels(labels) != -100
    student_gt = torch.randn(B, T, V)
    cands = ti.sample_candidates(student_gt, d, generator=torch.Generator().manual_seed(args.seed), mask=cand_mask)
    exp = ti.tpa_expand(input_ids, cands, cand_mask, attention_mask)
    print(f"ground truth T={T}, expanded T2={exp.expanded_len}, d={d}")
    print("ribbon mask of row 0 (first 24 slots; # = may attend):")
    m = exp.attention_mask[0, 0, :24, :24]
    for r in range(m.shape[0]):
        print("  " + "".join("#" if x else "." for x in m[r].tolist()))

    student = torch.randn(B, exp.expanded_len, V, requires_grad=True)
    teacher = torch.randn(B, exp.expanded_len, V)
    attn = torch.softmax(torch.randn(B, 2, T, T), -1)
    weights = ti.visual_importance(attn, instruction, visual)
    loss_fn = ti.AlignTILoss()
    total, parts = loss_fn(student, teacher, labels, expansion=exp, visual_weights=weights)
    total.backward()
    print("loss parts:", {k: round(float(v), 4) for k, v in parts.items()}, "total:", round(float(total.detach()), 4))
    print("grad norm:", float(student.grad.norm()))


if __name__ == "__main__":
    main()
