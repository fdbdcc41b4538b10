"""Record golden outputs of the layer and of short training runs (the architecture
restructuring must reproduce them; see tests/test_golden.py).

    python scripts/record_golden.py tests/golden/golden.pt

Per case: the layer's output and the gradients of every input and parameter for a fixed
seed (float32 and float64, dynamic on and off, wrapped-branch and split calls), and the
train losses of a fixed-seed 6-step GPT run per variant. Rewrite only when a change of
arithmetic is intended and stated in the commit message.

Every case uses ``init="copies"`` (the first release's initialisation, under which these
outputs were recorded): the default init changed to "hyperconn" later, which changes the
starting point but not the arithmetic these cases pin down.
"""

from __future__ import annotations

import sys
import tempfile

import torch

# (name, variant, layer kwargs)
LAYER_CASES = [
    ("residual", "residual", {}),
    ("hc", "hc", {}),
    ("hc-static", "hc", {"dynamic": False}),
    ("mhc", "mhc", {}),
    ("mhc-static", "mhc", {"dynamic": False}),
    ("mhc-implicit", "mhc", {"sinkhorn_backward": "implicit"}),
    ("isohc", "isohc", {}),
    ("isohc-polar", "isohc", {"iso_method": "polar"}),
    ("isohc-cubic", "isohc", {"iso_method": "ns-cubic"}),
    ("hybrid", "hybrid", {}),
    ("hybrid-fixed", "hybrid", {"hybrid_lambda": 0.3}),
    ("harmonized", "harmonized", {}),
    ("mhc-onehot", "mhc", {"pre_init": "onehot"}),
    ("mhc-recompute", "mhc", {"recompute": True}),
]


def layer_case(variant: str, kwargs: dict, dtype: torch.dtype) -> dict:
    import hyperconn
    torch.manual_seed(0)
    n = 1 if variant == "residual" else 4
    C = 16
    branch = torch.nn.Sequential(torch.nn.LayerNorm(C), torch.nn.Linear(C, C))
    layer = hyperconn.HyperConnection(C, n, branch, variant=variant, layer_index=1,
                                      **{"init": "copies", **kwargs}).to(dtype)
    with torch.no_grad():  # move the static logits away from init, so maps are non-trivial
        for name, p in layer.named_parameters():
            if name in ("b_pre", "b_post", "b_res"):
                p.add_(0.5 * torch.randn_like(p))
            if name == "alpha":
                p.fill_(0.3)
    layer.train()
    x = torch.randn(3, 5, n, C, dtype=dtype, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad(out, [x, *params.values()], g, allow_unused=True)
    rec = {"out": out.detach(), "grad_x": grads[0]}
    for (name, _), gr in zip(params.items(), grads[1:]):
        rec[f"grad_{name}"] = gr
    return rec


def train_case(variant: str) -> list[dict]:
    from hyperconn.train import TrainConfig, train
    n = 1 if variant == "residual" else 4
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.from_dict({
            "task": "kv", "steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "eval_every": 3, "eval_batches": 1, "log_every": 1,
            "seed": 3, "quiet": True, "out_dir": tmp, "device": "cpu", "threads": 1,
            "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "seq_len": 64,
                      "connection": {"variant": variant, "streams": n, "init": "copies"}},
        })
        train(cfg)
        import json
        rows = [json.loads(line) for line in open(f"{tmp}/metrics.jsonl")]
    # every logged number but the throughput (timing), step by step
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def record() -> dict:
    torch.set_num_threads(1)
    golden = {"layer": {}, "train": {}}
    for name, variant, kwargs in LAYER_CASES:
        for dtype in (torch.float32, torch.float64):
            golden["layer"][f"{name}/{dtype}".replace("torch.", "")] = layer_case(variant, kwargs, dtype)
    for variant in ("residual", "hc", "mhc", "isohc", "hybrid", "harmonized"):
        golden["train"][variant] = train_case(variant)
    return golden


def machine() -> dict:
    """What bit-for-bit equality depends on: the CPU (MKL and torch pick their kernels by
    it) and torch's version. Written beside the golden file; tests/test_golden.py demands
    bit equality only where it matches, rounding agreement elsewhere."""
    from hyperconn.bench.machine import _cpu_model
    return {"cpu": _cpu_model(), "torch": torch.__version__}


if __name__ == "__main__":
    import json
    from pathlib import Path
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/golden.pt")
    torch.save(record(), path)
    path.with_name("recorded_on.json").write_text(json.dumps(machine(), indent=1) + "\n")
    print(f"wrote {path} and {path.with_name('recorded_on.json')}")
