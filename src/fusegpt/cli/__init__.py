"""Command line: parses arguments into configs and calls the Python API, nothing else.

    fusegpt prune --method mi --sparsity 0.25 --output runs/mi25
    fusegpt eval --model runs/mi25 --data wiki news --json

One module per group of commands: :mod:`.prune` (prune, export), :mod:`.evaluate` (eval),
:mod:`.tools` (sweep, bench, report); :mod:`.common` holds what they share.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..checkpoint.atomic import OutputNotWritableError
from ..data import DataError
from ..loading import ModelLoadError
from ..settings import ConfigError
from .common import RawHelpFormatter, UsageError
from .evaluate import add_eval_parser
from .prune import add_export_parser, add_heal_parser, add_prune_parser
from .tools import add_bench_parser, add_report_parser, add_sweep_parser

logger = logging.getLogger("fusegpt")

EPILOG = """examples:
  fusegpt prune --method mi --sparsity 0.25 --output runs/mi25      # embedded SmolLM2, cpu preset on a CPU
  fusegpt prune --method fusegpt --sparsity 0.25 --dry-run --output runs/f25   # settings, memory, time; no work
  fusegpt prune --model meta-llama/Llama-2-7b-hf --method sleb --sparsity 0.2 --calib wikitext2 --output out
  fusegpt heal --model runs/mi25 --output runs/mi25-healed             # LoRA recovery fine-tuning, merged
  fusegpt eval --model runs/mi25 --data wiki news --max-tokens 32768 --json
  fusegpt eval --model runs/mi25 --tasks proxies --limit 100        # offline zero-shot proxies (lm-eval)
  fusegpt sweep --methods shortgpt,sleb,mi --sparsity 0.125,0.25 --output runs/sweep
  fusegpt bench --model embedded --model runs/mi25                  # latency, tokens/s, memory
  fusegpt report runs/mi25                                          # report.md with PNG plots
data sources: wiki, news (embedded), wikitext2, c4, ptb (hub), or a .txt / .jsonl file"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusegpt", description="Structured pruning of decoder LLMs.",
                                     epilog=EPILOG, formatter_class=RawHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", required=True)
    add_prune_parser(sub)
    add_heal_parser(sub)
    add_export_parser(sub)
    add_eval_parser(sub)
    add_sweep_parser(sub)
    add_bench_parser(sub)
    add_report_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.WARNING if args.quiet or getattr(args, "json", False) else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        return args.func(args)
    except (UsageError, ConfigError, DataError, ModelLoadError, FileExistsError, OutputNotWritableError,
            ValueError) as e:
        print(f"fusegpt: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:  # --max-memory crossed while running (the message says what to change)
        print(f"fusegpt: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a failure while writing results (the message says what was kept, and where)
        print(f"fusegpt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fusegpt: interrupted; no output was written", file=sys.stderr)
        return 130
