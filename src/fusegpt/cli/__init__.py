"""Command line: parses arguments into configs and calls the Python API, nothing else.

    fusegpt prune --method mi --sparsity 0.25 --output runs/mi25
    fusegpt eval --model runs/mi25 --data wiki news --json

One module per group of commands: :mod:`.prune` (prune, export), :mod:`.evaluate` (eval),
:mod:`.tools` (sweep, bench, report); :mod:`.common` holds what they share.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback

from ..api import state_hint
from ..errors import FusegptError
from ..runstate import Terminated
from .common import RawHelpFormatter, UsageError
from .evaluate import add_eval_parser
from .prune import add_export_parser, add_heal_parser, add_prune_parser, resume_command
from .tools import add_bench_parser, add_recipe_parser, add_report_parser, add_sweep_parser

logger = logging.getLogger("fusegpt")

EPILOG = """examples:
  fusegpt prune --method mi --sparsity 0.25 --output runs/mi25      # embedded SmolLM2, cpu preset on a CPU
  fusegpt prune --method fusegpt --sparsity 0.25 --dry-run --output runs/f25   # settings, memory, time; no work
  fusegpt prune --model meta-llama/Llama-2-7b-hf --method sleb --sparsity 0.2 --calib wikitext2 --output out
  fusegpt prune --method fusegpt --sparsity 0.25 --set help   # every setting, its bounds and help
  fusegpt prune --recipe runs/mi25/report.json --output runs/mi25-again  # re-run a finished run exactly
  fusegpt prune --method slimgpt --target-speedup 1.3 --runtime llamacpp --output runs/fast   # a speed target
  fusegpt heal --model runs/mi25 --set loss=kd --output runs/mi25-healed   # distil from the dense model, merged
  fusegpt eval --model runs/mi25 --data wiki news --max-tokens 32768 --json
  fusegpt eval --model runs/mi25 --tasks proxies --limit 100        # offline zero-shot proxies (lm-eval)
  fusegpt sweep --methods shortgpt,sleb,mi --sparsity 0.125,0.25 --output runs/sweep
  fusegpt bench --model embedded --model runs/mi25                  # latency, tokens/s, memory
  fusegpt bench --runtime llamacpp --dtypes f16,q4_k_m --model embedded --model runs/mi25   # pp512 / tg128
  fusegpt eval --model runs/mi25 --data wiki --teacher embedded     # KL, top-1, generation match to dense
  fusegpt report runs/mi25                                          # report.md with PNG plots
data sources: wiki, news (embedded), wikitext2, c4, ptb (hub), or a .txt / .jsonl file"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusegpt", description="Structured pruning of decoder LLMs.",
                                     epilog=EPILOG, formatter_class=RawHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of errors fusegpt reports in one line (also FUSEGPT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_prune_parser(sub)
    add_heal_parser(sub)
    add_export_parser(sub)
    add_eval_parser(sub)
    add_sweep_parser(sub)
    add_bench_parser(sub)
    add_report_parser(sub)
    add_recipe_parser(sub)
    return parser


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors fusegpt knows (:class:`~fusegpt.errors.FusegptError`: bad input, a refused
    operation, a failed save with its rescue) print one line and exit with their code (2, or 1 for
    failures after the work started); anything else is a bug and keeps its traceback. SIGTERM ends a
    run as Ctrl-C does (run state kept, resume command printed), with exit code 143."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    debug = args.debug or os.environ.get("FUSEGPT_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.WARNING if args.quiet or getattr(args, "json", False) else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except (UsageError, FusegptError) as e:
        if debug:
            traceback.print_exc()
        state = getattr(e, "state", None)
        hint = state_hint(state, getattr(e, "size", 0), True, resume_command(argv)) if state is not None else ""
        print(f"fusegpt: error: {e}{hint}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"fusegpt: {how}; no output was written", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
