"""The public entry points.

* :func:`prune` — the whole run from a model spec to a saved folder: resolve the settings, plan
  memory and time (printed before any long work), load, check, :func:`compress`, evaluate, save
  atomically, remove the run state, close the offloader. The CLI and the sweep call it.
* :func:`compress` — in memory: prune a loaded model with one config or a chain, return it and
  its :class:`~fusegpt.report.Report`.
* :func:`plan_run` — what :func:`prune` would do, from the model's config alone (``--dry-run``).
* :func:`evaluate` — perplexity, GPTQ protocol.

Methods are found through their records (:mod:`fusegpt.methods`); nothing here names one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_write_dir, check_output, save_pruned
from .checkpoint.atomic import check_free_space, output_lock
from .data import check_source, eval_tokens, token_stream
from .errors import DataError, FusegptError, SaveError
from .eval.perplexity import perplexity
from .heal import HealConfig
from .heal import heal as heal_model
from .loading import load_model, load_pruned, load_tokenizer, model_config
from .memory import (
    EstimateEnv,
    MemoryEstimate,
    ModelGeometry,
    budget_bytes,
    check_budget,
    format_size,
    perplexity_parts,
)
from .methods import method_of, parse_chain
from .methods import registry as _registry
from .methods.target import SpeedPlan, SpeedTarget, plan_speed
from .models import get_adapter
from .offload import offloader_of
from .report import Report, StepReport, library_versions
from .runstate import (
    Interrupted,
    RunContext,
    Terminated,
    check_state_policy,
    clear_state,
    folder_size,
    kept_state,
    state_root_for,
)
from .settings import ConfigError, EvalConfig, PruneConfig
from .speedmodel import load_cost_model
from .timing import format_duration, measure_flops, perplexity_seconds
from .utils import MemoryBudgetExceeded, MemoryGuard, PeakMemory, count_params, seed_everything

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- configs
def as_configs(config: PruneConfig | Sequence[PruneConfig]) -> list[PruneConfig]:
    configs = [config] if isinstance(config, PruneConfig) else list(config)
    if not configs:
        raise ConfigError("give at least one pruning config")
    for c in configs:
        method_of(c)  # a registered method, or a ConfigError naming the choices
    return configs


def configs_for(method: str, sparsity: str | float | Sequence[float], **settings: Any) -> list[PruneConfig]:
    """Configs of a method chain (``"mi+slimgpt"``) with one sparsity per step.

    ``settings``: the calibration keys and ``preset`` apply to every step; any other key goes to
    the steps whose config has it, and a key that no step has is an error. ``None`` = unset.
    """
    names = parse_chain(method)
    if isinstance(sparsity, str):
        try:
            sparsities = [float(x) for x in sparsity.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"sparsity must be a number in (0, 1) (or a comma list for chains), got {sparsity!r}") \
                from None
    elif isinstance(sparsity, (int, float)):
        sparsities = [float(sparsity)]
    else:
        sparsities = [float(x) for x in sparsity]
    if len(sparsities) != len(names):
        raise ConfigError(f"give one sparsity per method: {len(names)} method(s) ({', '.join(names)}), "
                          f"{len(sparsities)} value(s)")
    settings = {k: v for k, v in settings.items() if v is not None}
    used: set[str] = set()
    configs = []
    for name, s in zip(names, sparsities, strict=True):
        cls = _registry.get(name).config_cls
        own = {k: v for k, v in settings.items() if k in cls.setting_names()}
        used |= set(own)
        configs.append(cls().with_overrides(sparsity=s, **own))
    unused = set(settings) - used
    if unused:
        raise ConfigError(f"no method in {method!r} has setting(s) {', '.join(sorted(unused))}")
    return configs


def resolve_configs(configs: PruneConfig | Sequence[PruneConfig], device_type: str) -> list[PruneConfig]:
    """Every config with its unset fields filled (preset, then defaults) and validated."""
    return [c.resolve(device_type) for c in as_configs(configs)]


def check_plan(model: nn.Module | ModelGeometry, configs: Sequence[PruneConfig],
               eval_config: EvalConfig | None = None, *, offload: bool = False, device_type: str | None = None,
               heal: HealConfig | None = None) -> None:
    """Validate a resolved run against the model (or its geometry) before any long work: data
    sources, window lengths against the context (evaluation's and healing's too), the block budget of
    every step, each step's checks against the model's shapes (:meth:`PruneConfig.plan_model`) and
    against where it runs (``offload``, ``device_type``: :meth:`PruneConfig.plan_placement`), and the
    healing settings (resolved)."""
    g = ModelGeometry.of(model)
    n_layers, ctx = g.n_layers, g.max_context
    device_type = device_type or (get_adapter(model).device.type if isinstance(model, nn.Module) else "cpu")
    if eval_config is not None and ctx and eval_config.seqlen > ctx:
        raise ConfigError(f"evaluation seqlen {eval_config.seqlen} exceeds the model's context of {ctx} tokens; "
                          "lower --eval-seqlen")
    if offload and needs_teacher_copy(eval_config, heal):
        raise ConfigError("fidelity to the teacher (--fidelity) and online distillation keep the dense model beside "
                          "the pruned one, which a layer-wise run does not; drop them, or use teacher_signal=topk")
    n_start = n_layers
    for cfg in configs:
        cfg.require_resolved()
        for src in cfg.sources():
            check_source(src)
        for name, value in cfg.window_lengths():
            if ctx and value > ctx:
                fix = "lower --seqlen" if name == "seqlen" else f"lower it (--set {name}=...)"
                raise ConfigError(f"{cfg.method}: {name} {value} exceeds the model's context of {ctx} tokens; {fix}")
        n_layers = cfg.plan_layers(n_layers)
        cfg.plan_chain(n_start, n_layers)
        cfg.plan_model(g)
        cfg.plan_placement(offload, device_type)
    if heal is not None:
        heal.require_resolved()
        heal.plan_placement(offload, device_type)
        check_source(heal.source)
        if ctx and heal.seqlen > ctx:
            raise ConfigError(f"heal: seqlen {heal.seqlen} exceeds the model's context of {ctx} tokens; lower it "
                              "(--heal-set seqlen=...)")


def check_windows(tokenizer, configs: Sequence[PruneConfig], heal: HealConfig | None = None) -> None:
    """Every set of training-split windows the run will draw fits its text (tokenized once; no model needed)."""
    for cfg in [*configs, *([heal] if heal is not None else [])]:
        for source, need, what in cfg.windows():
            have = token_stream(tokenizer, source, "train").numel()
            if have < need + 1:
                raise DataError(f"{cfg.label}: data source {source} (train) has {have} tokens, fewer than {what} = "
                                f"{need}; lower those settings or give more text")


# ---------------------------------------------------------------------------- estimates
def _env(device: str | torch.device, dtype: torch.dtype | None, offload: bool, measure: bool = True) -> EstimateEnv:
    kind = torch.device(device).type
    dtype = dtype or (torch.float32 if kind == "cpu" else torch.bfloat16)
    return EstimateEnv(device_type=kind, nbytes=torch.finfo(dtype).bits // 8, offload=offload,
                       flops_per_s=measure_flops(str(device)) if measure else EstimateEnv.flops_per_s)


def estimate_memory(model_or_config, configs, dtype: torch.dtype | None = None, device: str = "cpu",
                    eval_config: EvalConfig | None = None, offload: bool = False) -> MemoryEstimate:
    """Peak memory of pruning ``model_or_config`` (a model, or just its config) with ``configs``:
    the weights plus the largest working set of any step (:mod:`fusegpt.memory`)."""
    g = ModelGeometry.of(model_or_config)
    env = _env(device, dtype, offload, measure=False)
    resolved = resolve_configs(configs, env.device_type)
    est = MemoryEstimate(weights=(g.params - g.blocks_params if offload else g.params) * env.nbytes)
    for cfg in resolved:
        est.steps.update(method_of(cfg).estimate_memory(g, cfg, env))
    if eval_config is not None:
        est.steps["perplexity"] = perplexity_parts(g, eval_config, env)
    # saving: safetensors serialises from contiguous host copies (one block at a time layer-wise);
    # measured +250 MB over scoring on the embedded model's width-pruned saves
    est.steps["save"] = {"serialised copy": env.resident_block(g) if offload else g.params * env.nbytes}
    return est


def estimate_seconds(model_or_config, configs, device: str = "cpu", eval_config: EvalConfig | None = None,
                     dtype: torch.dtype | None = None) -> dict[str, float]:
    """Rough seconds per step (and for evaluation before and after), from the device's measured rate."""
    g = ModelGeometry.of(model_or_config)
    env = _env(device, dtype, offload=False)
    out: dict[str, float] = {}
    n = g.n_layers
    for i, cfg in enumerate(resolve_configs(configs, env.device_type)):
        step_g = replace(g, n_layers=n)
        out[f"{i}-{cfg.method}"] = method_of(cfg).estimate_time(step_g, cfg, env)
        n = cfg.plan_layers(n)
    if eval_config is not None:
        tokens = eval_config.max_tokens or 300_000
        per = perplexity_seconds(g, tokens, eval_config.seqlen, env) * len(eval_config.data)
        out["evaluation"] = per + per * n / g.n_layers
    return out


def plan_offload(model_or_config, configs, budget: int | str, device: str = "cpu", eval_config=None,
                 offload: str | None = None, dtype: torch.dtype | None = None) -> str | None:
    """Honour a memory ``budget``: the offload storage to use (None: all resident), or MemoryError.

    With ``offload`` already chosen the layer-wise estimate must fit. Otherwise the model stays
    resident when it fits, and goes layer-wise (blocks on disk) when only that fits; when neither
    fits, the error gives both figures.
    """
    limit = budget_bytes(budget)
    layerwise = estimate_memory(model_or_config, configs, dtype, device, eval_config, offload=True)
    if offload is None:
        resident = estimate_memory(model_or_config, configs, dtype, device, eval_config)
        if resident.total <= limit:
            logger.info("memory estimate %s within the budget of %s", resident.describe(), format_size(limit))
            return None
        if layerwise.total <= limit:
            logger.warning("the model does not fit in %s resident (%s); running layer-wise with blocks on disk (%s)",
                           format_size(limit), format_size(resident.total), layerwise.describe())
            return "disk"
        raise MemoryError(
            f"this run needs about {resident.describe()} resident, and about {layerwise.describe()} layer-wise "
            f"(--offload disk), both more than the budget of {format_size(limit)}; lower nsamples/seqlen/batch sizes, "
            "group_size or max_terms (or the preset), use a bf16 model on CUDA, or raise --max-memory")
    check_budget(layerwise, limit)
    return offload


# ---------------------------------------------------------------------------- plan
@dataclass
class Placement:
    """Where and how the model is loaded: device, dtype, layer-wise offload, multi-GPU map, budget."""

    device: str = "cpu"
    dtype: torch.dtype | None = None
    offload: str | None = None
    offload_folder: str | None = None
    device_map: Any = None
    max_memory: str | int | None = None

    def __post_init__(self) -> None:
        check_device(self.device)


def check_device(device: str | torch.device) -> None:
    """A one-line error for a device this torch cannot use (before anything is loaded)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; give cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"device {device!r}: fusegpt runs on cpu, cuda, mps or xpu, not on {dev.type!r} "
                          "(a meta device holds no weights); use --device cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this torch has no usable CUDA (torch.cuda.is_available() is False); "
                          "use --device cpu or install a CUDA build of torch")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {device!r}: MPS is not available here; use --device cpu")


@dataclass
class RunPlan:
    """What a run will do: resolved settings with their origins, memory and time estimates."""

    model: str
    configs: list[PruneConfig]
    placement: Placement
    memory: MemoryEstimate
    seconds: dict[str, float]
    eval_config: EvalConfig | None = None
    heal: HealConfig | None = None
    output_bytes: int = 0  # the saved checkpoint, at most (the model as loaded)
    speed: SpeedPlan | None = None  # with a speed target: the candidates and their cost model
    teacher_note: str = ""  # how healing gets the dense teacher's signal, and what it costs

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def describe(self) -> str:
        """The plan as text: each step's settings (with where each value came from), memory, time."""
        lines = [f"model: {self.model}; device {self.placement.device}"
                 + (f", layer-wise ({self.placement.offload})" if self.placement.offload else "")]
        for i, cfg in enumerate(self.configs):
            origins = cfg.origins
            lines.append(f"step {i + 1}: {cfg.method}, sparsity {cfg.sparsity}, preset {cfg.preset} "
                         f"({origins.get('preset')})")
            lines += _setting_lines(cfg, skip=("method", "calib", "origins", "preset", "sparsity", "format"))
        if self.speed is not None:
            lines.append(self.speed.describe())
        if self.heal is not None:
            lines.append(f"heal: preset {self.heal.preset} ({self.heal.origins.get('preset')}); {self.teacher_note}")
            lines += _setting_lines(self.heal, skip=("preset", "origins", "format"))
        lines.append(f"memory: about {self.memory.describe()}")
        steps = ", ".join(f"{k} {format_duration(v)}" for k, v in self.seconds.items())
        lines.append(f"time: about {format_duration(self.total_seconds)} ({steps}); a rough estimate")
        return "\n".join(lines)


def _setting_lines(cfg, skip: tuple[str, ...]) -> list[str]:
    origins = cfg.origins
    return [f"    {k:<16} {v!s:<12} {origins.get(k, '')}" for k, v in cfg.to_dict().items() if k not in skip]


def plan_run(model_spec: str | None, configs, placement: Placement | None = None,
             eval_config: EvalConfig | None = None, model_name: str | None = None,
             heal: HealConfig | None = None) -> RunPlan:
    """Resolve, check and estimate a run from the model's config alone (no weights are read).

    Every check that needs no weights runs here, so ``--dry-run`` refuses what the run would refuse:
    settings, data sources, budgets, the steps' and healing's placement (layer-wise, also when
    ``max_memory`` chooses it)."""
    placement = placement or Placement()
    configs = as_configs(configs)
    for src in eval_config.data if eval_config else ():
        check_source(src)
    g = ModelGeometry.of(model_config(model_spec))  # built once: every estimate below reuses it
    kind = torch.device(placement.device).type
    resolved = resolve_configs(configs, kind)
    heal_r = heal.resolve(kind) if heal is not None else None
    check_plan(g, resolved, eval_config, offload=placement.offload is not None, device_type=kind, heal=heal_r)
    if placement.max_memory is not None:
        try:
            offload = plan_offload(g, resolved, placement.max_memory, placement.device, eval_config,
                                   offload=placement.offload, dtype=placement.dtype)
        except MemoryError as e:
            raise ConfigError(str(e)) from None
        if offload is not None and placement.offload is None:  # chosen for the budget: check it again
            try:
                check_plan(g, resolved, eval_config, offload=True, device_type=kind, heal=heal_r)
            except ConfigError as e:
                raise ConfigError(f"--max-memory {placement.max_memory} needs layer-wise execution, and {e}") from None
        placement = replace(placement, offload=offload)
    return _plan(g, resolved, placement, eval_config, model_name or model_spec or EMBEDDED_LABEL, heal_r)


EMBEDDED_LABEL = "embedded:SmolLM2-135M-Instruct"


def _plan(g: ModelGeometry, resolved: list[PruneConfig], placement: Placement, eval_config: EvalConfig | None,
          name: str, heal: HealConfig | None = None) -> RunPlan:
    """The checked run's memory and time estimates, as a :class:`RunPlan`."""
    memory = estimate_memory(g, resolved, placement.dtype, placement.device, eval_config,
                             offload=placement.offload is not None)
    seconds = estimate_seconds(g, resolved, placement.device, eval_config, placement.dtype)
    env = _env(placement.device, placement.dtype, placement.offload is not None, measure=False)
    plan = RunPlan(model=name, configs=resolved, placement=placement, memory=memory, seconds=seconds,
                   eval_config=eval_config, heal=heal, output_bytes=g.params * env.nbytes)
    if needs_teacher_copy(eval_config, heal):  # the dense model stays beside the pruned one
        memory.weights += g.params * env.nbytes
    if heal is not None:
        plan.teacher_note = heal.teacher_cost(g.vocab, g.params * env.nbytes)
    return plan


# ---------------------------------------------------------------------------- run
@dataclass
class PruneResult:
    """What :func:`prune` did: the plan, the report (None for a dry run), the output folder."""

    plan: RunPlan
    report: Report | None = None
    output: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def prune(
    model_spec: str | None,
    configs: PruneConfig | Sequence[PruneConfig],
    output: str | Path,
    *,
    placement: Placement | None = None,
    eval_config: EvalConfig | None = None,
    overwrite: bool = False,
    resume: bool = False,
    restart: bool = False,
    dry_run: bool = False,
    model_name: str | None = None,
    model: nn.Module | None = None,
    tokenizer=None,
    origin: Sequence[int] | None = None,
    baseline_perplexity: dict[str, float] | None = None,
    before_save: Callable[[nn.Module, Report], None] | None = None,
    save_model: bool = True,
    heal: HealConfig | None = None,
    target: SpeedTarget | None = None,
    teacher_model: nn.Module | None = None,
) -> PruneResult:
    """Prune ``model_spec`` (a folder, hub id, ``.gguf`` or None = embedded) into ``output``.

    Bad input stops with an error before any model work: the plan checks every setting it can from
    the config (:func:`plan_run`), the output's place (writable, free space, replaceable only if
    fusegpt wrote it), the run state, and then, with the tokenizer alone, that every data source
    holds enough text. The resolved plan (settings with their origin, memory, time) is logged
    first, and ``dry_run`` stops there. The output is locked for the whole run (a second run on it
    fails at once). Resumable steps keep their state in ``<output>.state/`` (removed after a
    successful save): ``resume`` continues it; an existing state is never discarded unless
    ``restart``. An interruption (Ctrl-C, SIGTERM through the command line) raises
    :class:`~fusegpt.runstate.Interrupted` with the state's place and size; a crossed
    ``--max-memory`` raises :class:`~fusegpt.utils.MemoryBudgetExceeded` with the same.

    ``model``/``tokenizer``: an already loaded model to prune instead of loading ``model_spec``
    (the sweep passes copies of one dense model), with ``origin`` when it was pruned before;
    ``baseline_perplexity``: the "before" figures when already known; ``before_save(model,
    report)``: a last hook before the atomic save; ``save_model=False`` writes only
    ``report.json``. ``heal``: recovery training after pruning (:mod:`fusegpt.heal`); the report
    gets ``heal`` and ``perplexity.healed``. ``target``: a speed-up to reach instead of the configs'
    sparsities (:mod:`fusegpt.methods.target`, from the runtime's cached cost model); for a depth +
    width chain every candidate split is pruned and the lowest calibration loss kept.
    ``teacher_model``: the dense model to distil from and measure fidelity against (default: a copy of
    the model before pruning, made only when ``eval_config.fidelity`` or an online-KD heal needs one;
    a top-k KD heal computes the teacher's logits before pruning instead, no copy).
    """
    placement = placement or Placement()
    protect = [model_spec] if model_spec and Path(model_spec).expanduser().exists() else []
    out = check_output(output, overwrite, protect)
    name = model_name or model_spec or EMBEDDED_LABEL
    speed = None
    if target is not None:
        configs, speed = speed_configs(model_spec if model is None else model.config, as_configs(configs), target,
                                       placement)
    plan = plan_run(model_spec, configs, placement, eval_config, name, heal=heal) if model is None else \
        _plan_loaded(model, configs, placement, eval_config, name, heal=heal)
    plan.speed = speed
    if speed is not None and len(speed.candidates) > 1 and resume:
        raise ConfigError("--resume with a chain's --target-speedup: the candidates keep no run state; run without "
                          "--resume")
    resumable = any(method_of(c).resumable for c in plan.configs)
    state_root = state_root_for(out) if resumable else None
    check_state_policy(state_root, resume, restart)
    if save_model:
        check_free_space(out.parent, int(plan.output_bytes * (3.05 if resumable else 1.05)),
                         "the checkpoint" + (" and its run state" if resumable else ""))
    if dry_run:
        return PruneResult(plan=plan)
    with output_lock(out):
        return _run(plan, out, protect, model_spec, model, tokenizer, origin, eval_config, overwrite, resume, restart,
                    state_root, baseline_perplexity, before_save, save_model, name, teacher_model)


def _run(plan: RunPlan, out: Path, protect: list, model_spec, model, tokenizer, origin, eval_config, overwrite: bool,
         resume: bool, restart: bool, state_root: Path | None, baseline_perplexity, before_save, save_model: bool,
         name: str, teacher_model: nn.Module | None = None) -> PruneResult:
    """:func:`prune` once the plan is checked and the output locked."""
    out = check_output(out, overwrite, protect)  # again: another run may have written it meanwhile
    check_state_policy(state_root, resume, restart)
    if restart:
        clear_state(state_root)
    logger.info("plan\n%s", plan.describe())
    if tokenizer is None:
        tokenizer = load_tokenizer(model_spec)
    check_windows(tokenizer, plan.configs, plan.heal)  # every text long enough, before the model is loaded
    if model is None:
        p = plan.placement
        model, tokenizer = load_model(model_spec, dtype=p.dtype, device=p.device, offload=p.offload,
                                      offload_folder=p.offload_folder, device_map=p.device_map)
    teacher = teacher_model
    if teacher is None and needs_teacher_copy(eval_config, plan.heal):
        import copy

        teacher = copy.deepcopy(model).eval()  # the dense model, kept as the teacher
    heal_signal = None
    if plan.heal is not None and plan.heal.uses_teacher:  # before pruning: the model is still the dense one
        heal_signal = _heal_teacher(teacher if teacher is not None else model, tokenizer, plan.heal)
    try:
        return _prune_heal_save(plan, out, protect, model, tokenizer, origin, eval_config, overwrite, resume,
                                state_root, baseline_perplexity, before_save, save_model, name, teacher, heal_signal)
    finally:
        if heal_signal is not None:
            heal_signal.close()  # a top-k teacher's files, whatever happened


def _prune_heal_save(plan: RunPlan, out: Path, protect: list, model, tokenizer, origin, eval_config,
                     overwrite: bool, resume: bool, state_root: Path | None, baseline_perplexity, before_save,
                     save_model: bool, name: str, teacher: nn.Module | None, heal_signal) -> PruneResult:
    budget = plan.placement.max_memory
    guard = contextlib.nullcontext() if budget is None else \
        MemoryGuard(budget_bytes(budget), plan.placement.device,
                    baseline_bytes=plan.memory.runtime + plan.memory.weights)
    resumable = state_root is not None
    try:
        with guard:
            if plan.speed is not None and len(plan.speed.candidates) > 1:
                model, report = _best_candidate(model, tokenizer, plan, name, eval_config, origin,
                                                baseline_perplexity, teacher)
            else:
                model, report = compress(model, tokenizer, plan.configs, model_name=name, eval_config=eval_config,
                                         origin=origin, state_dir=state_root, resume=resume,
                                         baseline_perplexity=baseline_perplexity, teacher=teacher)
    except MemoryBudgetExceeded as e:
        e.state = kept_state(state_root)
        e.size = folder_size(e.state) if e.state else 0
        raise
    except KeyboardInterrupt as e:
        kept = kept_state(state_root)
        raise Interrupted(kept, folder_size(kept) if kept else 0, resumable,
                          "SIGTERM" if isinstance(e, Terminated) else "SIGINT") from None
    report.extra["estimate"] = {"seconds": {k: round(v, 3) for k, v in plan.seconds.items()},
                                "memory_bytes": plan.memory.total}
    if plan.speed is not None:
        report.extra["speed_target"] = plan.speed.to_dict()
    if plan.heal is not None:
        model = _heal_and_measure(model, tokenizer, plan.heal, heal_signal, name, report, eval_config, teacher)
    if before_save is not None:
        before_save(model, report)
    if resume and not resumable:
        logger.warning("--resume: %s keep no run state; this run started from the beginning",
                       "+".join(c.method for c in plan.configs))
    _write_output(out, model, tokenizer, report, save_model, overwrite=overwrite, protect=protect)
    clear_state(state_root)
    off = offloader_of(model)
    if off is not None:
        off.close()  # the edited blocks are in the output now
    return PruneResult(plan=plan, report=report, output=out, extra={"model": model})


def needs_teacher_copy(eval_config: EvalConfig | None, heal: HealConfig | None) -> bool:
    """Whether a run keeps a copy of the dense model beside the pruned one (fidelity, or online distillation)."""
    return bool((eval_config is not None and eval_config.fidelity) or
                (heal is not None and heal.uses_teacher and heal.signal == "online"))


def _heal_and_measure(model: nn.Module, tokenizer, cfg: HealConfig, signal, teacher_name: str, report: Report,
                      eval_config: EvalConfig | None, teacher: nn.Module | None) -> nn.Module:
    """Heal ``model`` (closing the teacher's signal afterwards), then its perplexity and fidelity as ``healed``."""
    try:
        model, report.heal = heal_model(model, tokenizer, cfg, teacher=signal,
                                        teacher_name=teacher_name if signal is not None else None)
    finally:
        if signal is not None:
            signal.close()
    if eval_config is not None:
        report.perplexity["healed"] = evaluate(model, tokenizer, eval_config)
        if eval_config.fidelity and teacher is not None:
            report.fidelity["healed"] = evaluate_fidelity(model, teacher, tokenizer, eval_config)
    return model


def _heal_teacher(teacher: nn.Module, tokenizer, cfg: HealConfig):
    """The teacher's signal for ``cfg``'s healing windows (top-k logits now, or the model online)."""
    from .data import calibration_windows
    from .heal import make_teacher

    windows = calibration_windows(tokenizer, cfg.source, cfg.nsamples, cfg.seqlen, cfg.seed)
    return make_teacher(teacher, windows, cfg)


def evaluate_fidelity(model: nn.Module, teacher: nn.Module, tokenizer, config: EvalConfig) -> dict[str, dict]:
    """Fidelity to ``teacher`` (KL, top-1 agreement, generation match) on each source of ``config``."""
    from .eval.fidelity import fidelity

    out = {}
    for src in config.data:
        toks = eval_tokens(tokenizer, src, config.seqlen)
        out[src] = fidelity(model, teacher, toks, config.seqlen, config.max_tokens, config.prompts, config.prompt_len,
                            config.gen_len, config.batch_size, desc=f"fidelity {src}")
    return out


def speed_configs(model_spec_or_config, configs: list[PruneConfig], target: SpeedTarget, placement: Placement
                  ) -> tuple[list[PruneConfig], SpeedPlan]:
    """The chain's configs with the sparsities that meet ``target`` (the first candidate's), and the plan."""
    config = model_spec_or_config if not isinstance(model_spec_or_config, (str, type(None))) else \
        model_config(model_spec_or_config)
    kind = torch.device(placement.device).type
    cm = load_cost_model(config, target.runtime, target.dtype, target.threads, "cpu" if target.runtime == "llamacpp"
                         else kind)
    speed = plan_speed(config, configs, target, cm, kind)
    first = speed.candidates[0].sparsities
    return [c.with_overrides(sparsity=s) for c, s in zip(configs, first, strict=True)], speed


def _best_candidate(model: nn.Module, tokenizer, plan: RunPlan, name: str, eval_config, origin, baseline_perplexity,
                    teacher: nn.Module | None = None) -> tuple[nn.Module, Report]:
    """Prune a copy of ``model`` with every candidate split of the speed plan; keep the lowest calibration loss
    (on held-in windows of the first step's calibration text, disjoint from its calibration windows)."""
    import copy

    from .data import heldout_windows
    from .heal import mean_loss

    assert plan.speed is not None
    c0 = plan.configs[0]
    held = heldout_windows(tokenizer, c0.calib_source, 4, c0.seqlen, c0.seed, c0.nsamples)
    before = dict(baseline_perplexity) if baseline_perplexity else \
        (evaluate(model, tokenizer, eval_config) if eval_config is not None else None)
    best: tuple[float, nn.Module, Report] | None = None
    for cand in plan.speed.candidates:
        cfgs = [c.with_overrides(sparsity=s) for c, s in zip(plan.configs, cand.sparsities, strict=True)]
        logger.info("speed target: candidate sparsities %s", cand.sparsities)
        m, rep = compress(copy.deepcopy(model), tokenizer, cfgs, model_name=name, origin=origin)
        cand.calib_loss = mean_loss(m, held, 1)
        if best is None or cand.calib_loss < best[0]:
            best = (cand.calib_loss, m, rep)
        else:
            del m
    assert best is not None
    _, model, report = best
    if eval_config is not None:
        report.perplexity["before"] = before
        report.eval_settings = eval_config.to_dict()
        report.perplexity["after"] = evaluate(model, tokenizer, eval_config)
        if eval_config.fidelity and teacher is not None:
            report.fidelity["after"] = evaluate_fidelity(model, teacher, tokenizer, eval_config)
    return model, report


def _write_output(out: Path, model: nn.Module, tokenizer, report: Report, save_model: bool, rescue: bool = True,
                  **kw) -> None:
    """The checkpoint with its report (atomically), or the report alone. A save that fails (a full
    disk, a vanished folder) keeps the result in a fresh temporary folder and raises
    :class:`SaveError` saying where."""
    from safetensors import SafetensorError

    try:
        if save_model:
            save_pruned(model, tokenizer, out, report, **kw)
        else:
            atomic_write_dir(out, lambda tmp: report.save(tmp / "report.json"), **kw)
    except (OSError, SafetensorError) as e:
        if isinstance(e, FusegptError) or not rescue:  # refused before writing: nothing to rescue
            raise
        raise SaveError(f"could not save to {out} ({e}); {_rescue(model, tokenizer, report, save_model)}") from e


def _rescue(model: nn.Module, tokenizer, report: Report, save_model: bool) -> str:
    """After a failed save, keep the pruned model in a fresh temporary folder; say where (or that it could not)."""
    import tempfile

    from safetensors import SafetensorError

    try:
        spare = Path(tempfile.mkdtemp(prefix="fusegpt-rescued-")) / "output"
        _write_output(spare, model, tokenizer, report, save_model, rescue=False)
        return f"the pruned model was saved to {spare} instead; move it where you want it"
    except (OSError, SafetensorError) as e:
        return f"saving it to a temporary folder failed as well ({e}); nothing was kept"


def _plan_loaded(model: nn.Module, configs, placement: Placement, eval_config, name: str,
                 heal: HealConfig | None = None) -> RunPlan:
    """:func:`plan_run` for a model already loaded (its own device and offload)."""
    device = get_adapter(model).device
    resolved = resolve_configs(configs, device.type)
    heal_r = heal.resolve(device.type) if heal is not None else None
    offload = getattr(offloader_of(model), "storage", None)
    check_plan(model, resolved, eval_config, offload=offload is not None, device_type=device.type, heal=heal_r)
    placement = replace(placement, device=str(device), dtype=None, offload=offload)
    return _plan(ModelGeometry.of(model), resolved, placement, eval_config, name, heal_r)


def compress(
    model: nn.Module,
    tokenizer,
    config: PruneConfig | Sequence[PruneConfig],
    model_name: str = "",
    eval_config: EvalConfig | None = None,
    origin: Sequence[int] | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    baseline_perplexity: dict[str, float] | None = None,
    teacher: nn.Module | None = None,
) -> tuple[nn.Module, Report]:
    """Prune ``model`` in place with one config or a chain of them; return it and the Report.

    Unset settings are resolved for the model's device (``cpu`` preset on a CPU, ``paper`` on
    CUDA). With ``eval_config``, perplexity is measured before (unless ``baseline_perplexity``
    gives it) and after. ``origin``: original block indices of a model pruned before.
    ``state_dir``/``resume``: where resumable steps keep their state, and whether to continue it.
    ``teacher``: the dense model, for fidelity (``eval_config.fidelity``) after pruning.
    """
    adapter = get_adapter(model, origin)
    configs = resolve_configs(config, adapter.device.type)
    check_plan(model, configs, offload=adapter.offloader is not None, device_type=adapter.device.type)
    report = Report(
        model=model_name or getattr(model.config, "_name_or_path", ""),
        seed=configs[0].seed,
        layers_before=adapter.num_layers,
        params_before=count_params(model),
        device=str(adapter.device),
        versions=library_versions(),
    )
    if eval_config is not None:
        report.perplexity["before"] = dict(baseline_perplexity) if baseline_perplexity else \
            evaluate(model, tokenizer, eval_config)
        report.eval_settings = eval_config.to_dict()
    ctx = RunContext.start(adapter, tokenizer, state_dir, resume)
    start = time.perf_counter()
    earlier = 0.0
    with PeakMemory(adapter.device) as mem:
        for i, cfg in enumerate(configs):
            logger.info("%s: sparsity %s, preset %s (%s)", cfg.method, cfg.sparsity, cfg.preset,
                        cfg.origins.get("preset"))
            seed_everything(cfg.seed)
            ctx.start_step(i)
            step = StepReport(method=cfg.method, config=cfg.to_dict())
            with PeakMemory(adapter.device) as step_mem:
                method_of(cfg).run(ctx, cfg, step)
            step.wall_time_s = ctx.step_elapsed()
            earlier += ctx.earlier_s
            step.peak_memory_mb = round(step_mem.peak_mb, 1)
            report.steps.append(step)
            logger.info("%s done in %.1fs%s", cfg.method, step.wall_time_s,
                        f" ({ctx.earlier_s:.1f}s of it before the resume)" if step.resumed else "")
    report.wall_time_s = time.perf_counter() - start + earlier
    report.peak_memory_mb = round(mem.peak_mb, 1)
    report.layers_after = adapter.num_layers
    report.params_after = count_params(model)
    report.extra["origin"] = adapter.origin
    if eval_config is not None:
        report.perplexity["after"] = evaluate(model, tokenizer, eval_config)
        if eval_config.fidelity and teacher is not None:
            report.fidelity["after"] = evaluate_fidelity(model, teacher, tokenizer, eval_config)
    return model, report


def evaluate(model: nn.Module, tokenizer, config: EvalConfig | None = None) -> dict[str, float]:
    """Perplexity (GPTQ protocol) on each source of ``config.data``: ``{source: ppl}``."""
    config = config or EvalConfig()
    for src in config.data:
        check_source(src)
    out = {}
    for src in config.data:
        toks = eval_tokens(tokenizer, src, config.seqlen)
        out[src] = perplexity(model, toks, config.seqlen, config.max_tokens, config.batch_size, desc=f"ppl {src}")
    return out


def heal_checkpoint(model_spec: str, output: str | Path, config: HealConfig | None = None, *,
                    eval_config: EvalConfig | None = None, overwrite: bool = False,
                    placement: Placement | None = None, teacher: str | None = None) -> Report:
    """``fusegpt heal``: load a (pruned) checkpoint, heal it, save it to ``output`` atomically.

    The folder's ``report.json`` (when present) is carried over with ``heal`` filled and the
    perplexity of the input as ``after`` and of the healed model as ``healed`` (the report's stages).
    ``teacher``: the dense model for distillation (``loss=kd|kd+lm``) and fidelity; default: the
    model the folder's report names as its source. Everything checkable (settings, data, the teacher,
    the output's place) is checked before the model loads.
    """
    placement = placement or Placement()
    out = check_output(output, overwrite, protect=[model_spec])
    kind = torch.device(placement.device).type
    cfg = (config or HealConfig()).resolve(kind)
    for src in eval_config.data if eval_config else ():
        check_source(src)
    g = ModelGeometry.of(model_config(model_spec))
    check_plan(g, [], eval_config, offload=placement.offload is not None, device_type=kind, heal=cfg)
    check_free_space(out.parent, int(g.params * _env(placement.device, placement.dtype, False, False).nbytes * 1.05),
                     "the healed checkpoint")
    carried = Path(model_spec) / "report.json"
    report = Report.load(carried) if carried.is_file() else Report(model=str(model_spec), versions=library_versions())
    teacher_spec = teacher_source(teacher, report if carried.is_file() else None,
                                  needed=cfg.uses_teacher or bool(eval_config and eval_config.fidelity))
    if teacher_spec is not _NO_TEACHER:
        tcfg = model_config(teacher_spec)
        if tcfg.get_text_config().vocab_size != g.vocab:
            raise ConfigError(f"the teacher {teacher_spec or 'embedded'} has a vocabulary of "
                              f"{tcfg.get_text_config().vocab_size}, the model {g.vocab}: distillation needs the same "
                              "tokenizer; give the dense model this one was pruned from (--teacher)")
    with output_lock(out):
        out = check_output(out, overwrite, protect=[model_spec])
        tok = load_tokenizer(model_spec)
        check_windows(tok, [], cfg)
        tmodel = None
        if teacher_spec is not _NO_TEACHER:
            tmodel, _ = load_model(teacher_spec, dtype=placement.dtype, device=placement.device)
        model, tok = load_pruned(model_spec, dtype=placement.dtype, device=placement.device)
        if eval_config is not None:
            report.perplexity["after"] = evaluate(model, tok, eval_config)
            report.eval_settings = eval_config.to_dict()
            if eval_config.fidelity and tmodel is not None:
                report.fidelity["after"] = evaluate_fidelity(model, tmodel, tok, eval_config)
        signal = _heal_teacher(tmodel, tok, cfg) if cfg.uses_teacher and tmodel is not None else None
        model = _heal_and_measure(model, tok, cfg, signal, teacher_spec or EMBEDDED_LABEL, report, eval_config, tmodel)
        _write_output(out, model, tok, report, True, overwrite=overwrite, protect=[model_spec])
    return report


_NO_TEACHER = object()


def teacher_source(teacher: str | None, report: Report | None, needed: bool):
    """The teacher's model spec: ``teacher`` as given (``embedded`` = the embedded model), else the model the
    report names as its source; ``_NO_TEACHER`` when none is needed; a ConfigError when one is needed and
    none can be found."""
    if teacher is not None:
        return None if teacher in ("embedded", EMBEDDED_LABEL) else teacher
    if not needed:
        return _NO_TEACHER
    src = report.model if report is not None else None
    if src in ("", None):
        raise ConfigError("this healing needs the dense teacher (loss=kd / kd+lm, or --fidelity), and the folder has "
                          "no report.json naming the model it was pruned from: give --teacher DENSE")
    if src == EMBEDDED_LABEL:
        return None
    if Path(src).expanduser().exists() or src.count("/") == 1:
        return src
    raise ConfigError(f"the folder's report names its source as {src!r}, which is neither a folder here nor a hub id; "
                      "give --teacher DENSE")


def interrupted_message(err: Interrupted, resume_command: str | None = None) -> str:
    """What to tell a user whose run was interrupted: where the state is, its size, how to resume."""
    how = "terminated (SIGTERM)" if err.signal == "SIGTERM" else "interrupted"
    return f"{how}; no output was written" + state_hint(err.state, err.size, err.resumable, resume_command)


def state_hint(state: Path | None, size: int, resumable: bool = True, resume_command: str | None = None) -> str:
    """``. Run state kept in X (size); resume with: ...`` or why nothing was kept."""
    if state is None:
        why = "" if resumable else " (these methods keep no run state)"
        return f"; nothing was kept to resume from{why}"
    msg = f". Run state kept in {state} ({format_size(size)})"
    if resume_command:
        msg += f"; resume with:\n  {resume_command}"
    return msg
