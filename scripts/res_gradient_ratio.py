"""Does H_res get a gradient? ‖∂L/∂b_res‖ / ‖∂L/∂b_post‖ (static logits, all layers) at init
and after 20 / 100 AdamW steps, in a 2-block GPT on a copy task (issue 17).

    python scripts/res_gradient_ratio.py [--steps 20 100] [--seeds 0 1 2]

For each variant and init (the named schemes of ``hyperconn.inits`` and the offset alone
with a uniform read), prints the median over seeds of the ratio at init and after each number
of steps. The required property of a default for the constrained variants: ≥ 3e-3 at
init and after 20 steps.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from hyperconn.models import GPT, GPTConfig

VARIANTS = ("hc", "mhc", "isohc", "hybrid", "mhc-lite", "kromhc", "orthostochastic", "circulant")
# The named schemes (hyperconn.inits) and the offset alone (with the uniform read).
INITS = {"copies": {"init": "copies"}, "offset 0.1, uniform read": {"init": "copies", "stream_offset": 0.1},
         "hyperconn (default: offset 0.1 + one-hot read)": {"init": "hyperconn"},
         "hc-paper": {"init": "hc-paper"}, "hyper-connections": {"init": "hyper-connections"},
         "megatron": {"init": "megatron"}}


def copy_batch(g: torch.Generator, batch: int = 16, half: int = 16, vocab: int = 64):
    first = torch.randint(0, vocab, (batch, half), generator=g)
    seq = torch.cat([first, first], 1)
    return seq[:, :-1], seq[:, 1:]


def ratio(model) -> float:
    res = sum(float(c.b_res.grad.norm()) ** 2 for c in model.connections()) ** 0.5
    post = sum(float(c.b_post.grad.norm()) ** 2 for c in model.connections()) ** 0.5
    return res / post if post > 0 else float("nan")


def measure(variant: str, init: dict, seed: int, checkpoints) -> list[float]:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=64, seq_len=32, n_layer=2, n_head=2, n_embd=32,
                    connection={"variant": variant, "streams": 4, **init})
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    out, step = [], 0
    for target in (0, *checkpoints):
        while step < target:
            x, y = copy_batch(g)
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        x, y = copy_batch(torch.Generator().manual_seed(10_000 + seed))
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        out.append(ratio(model))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[20, 100])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    torch.set_num_threads(1)
    cols = ["init"] + [f"after {s}" for s in a.steps]
    print("| variant | init | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for variant in VARIANTS:
        for name, init in INITS.items():
            runs = [measure(variant, init, seed, a.steps) for seed in a.seeds]
            med = [statistics.median(r[i] for r in runs) for i in range(len(cols))]
            print(f"| {variant} | {name} | " + " | ".join(f"{v:.2g}" for v in med) + " |", flush=True)


if __name__ == "__main__":
    main()
