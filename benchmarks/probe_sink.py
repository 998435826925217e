"""How much of a group's output error sits on the attention-sink token, before and after training.

On the embedded model the first token of every window carries a massive activation (norm ~23,000
against a median of ~200 per token). This probe takes the dense model, removes block ``--block``
from its group of 8, and prints on 8 held-out ``wiki`` windows of 256 tokens: the group MSE, the
share of the squared error on token 0, the MSE without token 0 and token 0's output norm (student /
teacher), once before and once after one group training with the ``cpu`` preset and ``--set``.

    python benchmarks/probe_sink.py --block 12 --set lr_coef=0.01 warmup=0.25 keep_best=False sink_ratio=0
"""

from __future__ import annotations

import argparse
import ast
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_fusegpt.py; before torch is imported

import torch  # noqa: E402

from fusegpt import config_for, load_model  # noqa: E402
from fusegpt.data import calibration_windows  # noqa: E402
from fusegpt.fusion import group_window  # noqa: E402
from fusegpt.methods.fusegpt.loop import _fuse_and_train, _group_outputs, _states_entering  # noqa: E402
from fusegpt.models import get_adapter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=12)
    ap.add_argument("--method", default="fusegpt", choices=("fusegpt", "mi+ft"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings over the cpu preset")
    args = ap.parse_args()
    kw = {k: ast.literal_eval(v) for k, v in (p.split("=", 1) for p in args.set)}
    model, tok = load_model()
    for q in model.parameters():
        q.requires_grad_(False)
    ad = get_adapter(model)
    cfg = config_for(args.method, preset="cpu", **kw).resolve()
    ft = calibration_windows(tok, "wiki", cfg.ft_nsamples, cfg.ft_seqlen, 0)
    held = calibration_windows(tok, "wiki", 8, 256, 12345)
    group = group_window(args.block, ad.num_layers, 8)
    student = [j for j in group if j != args.block]
    with torch.no_grad():
        h_in = _states_entering(ad, held, group[0], 8)
        t = _group_outputs(ad, group, h_in, 8)

    def show(tag: str) -> None:
        with torch.no_grad():
            s = _group_outputs(ad, student, h_in, 8)
        e = (s - t).float().pow(2).sum(-1)
        d = t.shape[-1]
        print(f"{tag}: MSE {float(e.mean() / d):.4f}, token-0 share {float(e[:, 0].sum() / e.sum()):.3f}, "
              f"MSE without token 0 {float(e[:, 1:].mean() / d):.4f}; token-0 norm student / teacher "
              f"{float(s[:, 0].norm(dim=-1).mean()):.0f} / {float(t[:, 0].norm(dim=-1).mean()):.0f}; "
              f"median token norm {float(t[:, 1:].norm(dim=-1).median()):.0f}", flush=True)

    show(f"block {args.block} removed from {group}, before training")
    info = _fuse_and_train(ad, args.block, group, ft, args.method == "fusegpt", 0, 0, cfg)
    print("training loss per epoch", [round(x, 4) for x in info.loss_per_epoch])
    show("after training")


if __name__ == "__main__":
    main()
