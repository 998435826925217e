"""One-group probe for choosing the ``cpu`` preset: fusion vs plain fine-tuning on one removal.

Ranks the dense embedded model by MI once, takes the lowest block p and its group, and for each
variant (plain removal, MI+FT at some learning rates, FuseGPT with some settings) trains the group
once from the same start, then reports the group's output MSE on held-out windows and the
perplexity of the model with p removed (``wiki`` test, seqlen 512, ``--max-tokens``). Much cheaper
than a full 8-block run; it does not see the error that piles up over iterations.

``fit_s`` is the group training alone (no evaluation). ``--equal-time`` adds, after the listed
variants, the FuseGPT/MI+FT pair at equal wall time: both at the preset's steps, timed back to back
in this process, then the method with the cheaper step once more with its epochs scaled so that its
training takes as long as the other's (the same load for both, whatever else runs on the machine).

    flock /tmp/fusegpt-cpu.lock .venv/bin/python benchmarks/tune_fusegpt_group.py
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_fusegpt.py; before torch is imported


from fusegpt import EvalConfig, config_for, evaluate, load_model  # noqa: E402
from fusegpt.blocks import remove_blocks  # noqa: E402
from fusegpt.data import calibration_windows  # noqa: E402
from fusegpt.fusion import eval_loss, group_window  # noqa: E402
from fusegpt.importance import lowest, mi_scores  # noqa: E402
from fusegpt.methods.fusegpt.loop import _fuse_and_train, _group_outputs, _states_entering  # noqa: E402
from fusegpt.models import get_adapter  # noqa: E402

# The settings the probe table in RESULTS.md §7 was measured with (the ``cpu`` preset before
# 2026-12-01): rates 1e-3 and no sink damping, under every variant's own settings and ``--set``.
PROBE_BASE = {"fusegpt": {"lr_coef": 1e-3, "sink_ratio": 0.0}, "mi+ft": {"lr": 1e-3, "sink_ratio": 0.0}}
# the pair that ``--equal-time`` times, one per method
EQUAL_TIME = {"fusegpt": "fuse cpu (1e-3/1e-3)", "mi+ft": "ft lr1e-3"}

VARIANTS = {
    "removal": None,
    "ft lr1e-3": ("mi+ft", {"lr": 1e-3}),
    "ft lr3e-3": ("mi+ft", {"lr": 3e-3}),
    "ft bs4": ("mi+ft", {"batch_size": 4}),
    "ft mse+cosine": ("mi+ft", {"loss": "mse+cosine"}),
    "fuse cpu (1e-3/1e-3)": ("fusegpt", {}),
    "fuse paper lrs (1e-3/9.65e-6)": ("fusegpt", {"lr_base": 9.65e-6}),
    "fuse coef lr 1e-2": ("fusegpt", {"lr_coef": 1e-2}),
    "fuse bs4": ("fusegpt", {"batch_size": 4}),
    "fuse kl-batch": ("fusegpt", {"loss": "kl-batch"}),
    "fuse kl-logits": ("fusegpt", {"loss": "kl-logits"}),
    "fuse coef only (LoRA/norm lr 0)": ("fusegpt", {"lr_base": 0.0}),
    "fuse 48 steps": ("fusegpt", {"epochs": 12}),
    "fuse 80 steps": ("fusegpt", {"epochs": 20}),
    "ft 48 steps": ("mi+ft", {"epochs": 12}),
    "ft 80 steps": ("mi+ft", {"epochs": 20}),
    "fuse training=paper (no warm-up or clipping)": ("fusegpt", {"training": "paper"}),
    "fuse no clipping": ("fusegpt", {"clip_grad": 0.0}),
    "fuse clip 10": ("fusegpt", {"clip_grad": 10.0}),
    "fuse no warm-up": ("fusegpt", {"warmup": 0.0}),
    "fuse mse+cosine": ("fusegpt", {"loss": "mse+cosine"}),
    "fuse group 4": ("fusegpt", {"group_size": 4}),
    "ft group 4": ("mi+ft", {"group_size": 4}),
    "fuse group 12": ("fusegpt", {"group_size": 12}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings over the cpu preset for all")
    ap.add_argument("--out", default="benchmarks/out/tune_group.json")
    ap.add_argument("--equal-time", action="store_true", help="add the FuseGPT / MI+FT pair at equal wall time")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    common = {k: eval(v) if v[:1].isdigit() else v for k, v in (p.split("=", 1) for p in args.set)}
    dense, tok = load_model()
    for q in dense.parameters():
        q.requires_grad_(False)
    adapter = get_adapter(dense)
    base = config_for("fusegpt", preset="cpu", **common)
    r0 = base.resolve()
    calib = calibration_windows(tok, "wiki", r0.nsamples, r0.seqlen, 0)
    ft = calibration_windows(tok, "wiki", r0.ft_nsamples, r0.ft_seqlen, 0)
    held = calibration_windows(tok, "wiki", 8, r0.ft_seqlen, 12345)
    p = lowest(mi_scores(adapter, calib), 1)[0]
    group = group_window(p, adapter.num_layers, r0.group_size)
    student = [j for j in group if j != p]
    evalc = EvalConfig(data=("wiki",), seqlen=512, max_tokens=args.max_tokens)
    rows = []

    def run(name: str, spec) -> dict:
        model = copy.deepcopy(dense)
        ad = get_adapter(model)
        h_in = _states_entering(ad, held, group[0], 8)
        h_t = _group_outputs(ad, group, h_in, 8)
        t0 = time.perf_counter()
        info = {}
        if spec is not None:
            method, kw = spec
            cfg = config_for(method, preset="cpu", **{**PROBE_BASE[method], **common, **kw}).resolve()
            # a variant's own group size trains its own window; the held-out MSE stays on the base group
            trained = group_window(p, ad.num_layers, cfg.group_size)
            info = _fuse_and_train(ad, p, trained, ft, method == "fusegpt", 0, 0, cfg).to_dict()
        fit_s = time.perf_counter() - t0
        held_mse = eval_loss(ad, student, h_in, h_t, "mse", 8)
        remove_blocks(ad, [p])
        ppl = evaluate(model, tok, evalc)["wiki"]
        row = {"variant": name, "block": p, "held_mse": held_mse, "train_loss": info.get("loss_per_epoch"),
               "ppl_wiki": ppl, "fit_s": round(fit_s, 1), "train_s": round(time.perf_counter() - t0, 1)}
        if spec is not None:
            row["epochs"] = len(info.get("loss_per_epoch") or [])
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    for name in [v for v in args.variants.split(",") if v]:
        run(name, VARIANTS[name])
    if args.equal_time:
        per_epoch = {}
        for method, name in EQUAL_TIME.items():
            row = run(name, VARIANTS[name])
            per_epoch[method] = row["fit_s"] / row["epochs"]
        cheap = min(per_epoch, key=per_epoch.get)
        dear = next(m for m in per_epoch if m != cheap)
        epochs = max(1, round(r0.epochs * per_epoch[dear] / per_epoch[cheap]))
        kw = dict(VARIANTS[EQUAL_TIME[cheap]][1], epochs=epochs)
        run(f"{'fuse' if cheap == 'fusegpt' else 'ft'} at {dear}'s wall time ({epochs} epochs)", (cheap, kw))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
