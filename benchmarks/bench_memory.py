"""Peak memory of layer-wise runs on a ~1B random model, against the model's own size.

Builds (once) a randomly initialised LLaMA-architecture checkpoint of about 1.2B parameters
(TinyLlama geometry: 22 blocks, hidden 2048, FFN 5632, 32 heads / 4 K/V heads, with the embedded
SmolLM2 tokenizer's 49,152-token vocabulary) in bf16 safetensors, then runs each job in a fresh
process and records its peak RSS (``ru_maxrss``): perplexity resident and layer-wise, and MI,
SlimGPT and FuseGPT layer-wise (``--offload disk``), computing in fp32 on the CPU. Random weights:
the figures are about memory, not quality.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py --workdir /work/runs/mem1b

Writes ``benchmarks/out/memory.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

GEOMETRY = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)

JOBS = {
    "ppl resident": dict(kind="ppl", offload=None),
    "ppl layer-wise": dict(kind="ppl", offload="disk"),
    "mi layer-wise": dict(kind="prune", offload="disk", method="mi",
                          settings=dict(sparsity=1 / 22, nsamples=2, seqlen=128)),
    "slimgpt layer-wise": dict(kind="prune", offload="disk", method="slimgpt",
                               settings=dict(sparsity=0.2, nsamples=4, seqlen=128)),
    "fusegpt layer-wise": dict(kind="prune", offload="disk", method="fusegpt",
                               settings=dict(sparsity=1 / 22, nsamples=2, seqlen=128, ft_nsamples=4, ft_seqlen=128,
                                             epochs=1, batch_size=4, lora_rank=8, coef_rank=8, loss="mse",
                                             max_terms=1, group_size=8, preset="cpu")),
}


def make_model(path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fusegpt.loading import load_model

    _, tok = load_model(None)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), **GEOMETRY)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():  # a little less random than the init: keep activations in range over 22 blocks
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.mul_(0.5)
    model.save_pretrained(path, max_shard_size="1GB")
    tok.save_pretrained(path)


def run_job(path: Path, name: str, out: Path, ppl_tokens: int) -> None:
    import torch

    from fusegpt import EvalConfig, compress, config_for
    from fusegpt.data import eval_tokens
    from fusegpt.eval.perplexity import perplexity
    from fusegpt.loading import load_model
    from fusegpt.offload import offloader_of
    from fusegpt.utils import count_params

    job = JOBS[name]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_model(str(path), offload=job["offload"], offload_folder=str(out.parent / f"store-{os.getpid()}")
                            if job["offload"] else None)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = {"job": name, "params": count_params(model), "offload": job["offload"], "rss_after_load_mb": rss_loaded}
    if job["kind"] == "ppl":
        toks = eval_tokens(tok, "wiki", 256)
        res["ppl"] = perplexity(model, toks, 256, max_tokens=ppl_tokens)
        res["ppl_tokens"] = ppl_tokens
    else:
        cfg = config_for(job["method"], calib_source="wiki", **job["settings"])
        model, rep = compress(model, tok, cfg, eval_config=EvalConfig(data=("wiki",), seqlen=256, max_tokens=ppl_tokens))
        res.update(removed=rep.removed, layers_after=rep.layers_after, params_after=rep.params_after,
                   ppl=rep.perplexity, settings={k: v for k, v in cfg.to_dict().items() if k != "calib"})
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps(res, indent=1))
    off = offloader_of(model)
    if off is not None:  # the edited blocks' store
        off.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/fusegpt-mem1b")
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated, from: {', '.join(JOBS)}")
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/out/memory.json")
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one job in this process
    args = ap.parse_args()
    work = Path(args.workdir)
    ckpt = work / "random-1b"
    if args.job:
        run_job(ckpt, args.job, work / f"{args.job.replace(' ', '_')}.json", args.ppl_tokens)
        return
    if not (ckpt / "config.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, 'benchmarks'); import bench_memory as b; "
                        f"from pathlib import Path; b.make_model(Path({str(ckpt)!r}))"], check=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name in args.jobs.split(","):
        subprocess.run([sys.executable, __file__, "--workdir", str(work), "--job", name,
                        "--ppl-tokens", str(args.ppl_tokens)], check=True)
        results[name] = json.loads((work / f"{name.replace(' ', '_')}.json").read_text())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    params = next(iter(results.values()))["params"]
    size_mb = params * 4 / 2**20
    print(f"model: {params / 1e9:.2f}B parameters, {size_mb:,.0f} MB in fp32 ({params * 2 / 2**20:,.0f} MB bf16 on disk)")
    print("| job | peak RSS MB | × fp32 model | RSS after load MB | wall s |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['peak_rss_mb']:,.0f} | {r['peak_rss_mb'] / size_mb:.2f} | {r['rss_after_load_mb']:,.0f} "
              f"| {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
