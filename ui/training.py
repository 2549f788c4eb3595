"""What the Train and Runs pages say about runs, recipes and checkpoints: the recipe from the preset and
the knobs, what each preset is for, where a run is, labels of checkpoints, and the comparison of recipes.
Plain Python over the engine's configs and the service's records (read by attribute)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from domain.kinds import CheckpointKind, RunKind
from domain.records import CheckpointInfo, RunInfo, RunProgress
from domain.scores import DECIDES, HeldOut, Score
from unet.network.config import PRESETS, TrainConfig, preset

PRESET_NOTES = {
    "cpu-quick": "tuned on ISBI 2012 for about 10 minutes on 2 idle CPU cores (the estimate below is for here)",
    "gpu": "the default on a GPU: ISBI quality within 8 minutes, batches made on the GPU",
    "gpu-full": "the paper's full-width network (valid padding), for a GPU",
    "tiny": "a few seconds on a CPU: to try the app out",
}
VAL_KEYS = ("val_loss", "val_pixel_error", "val_dice", "val_rand_f", "val_vi", "val_v_rand", "val_v_info",
            "val_vi_split", "val_vi_merge", "val_are")


def describe_preset(name: str) -> str:
    """One line on a preset: what it is for, its network and its length."""
    config = PRESETS[name]
    note = PRESET_NOTES.get(name, "")
    return (f"{note + ' · ' if note else ''}width {config.model.initial_features}, depth {config.model.depth}, "
            f"{config.steps:,} steps of {config.batch_size} × {config.patch_size}² patches")


def recipe(preset_name: str, *, width: int, depth: int, padding: str, patch: int, batch: int, steps: int, lr: float,
           loss: str, flips: bool, elastic: float, intensity: float, budget_min: float, seed: int) -> TrainConfig:
    """The training config of a preset changed by the page's knobs; ValueError or TypeError say what is
    wrong with them."""
    base = PRESETS[preset_name]
    return preset(preset_name, model={"initial_features": int(width), "depth": int(depth), "padding": padding},
                  patch_size=int(patch), batch_size=int(batch), steps=int(steps), lr=float(lr), loss=loss,
                  max_seconds=float(budget_min) * 60 if budget_min else None, seed=int(seed),
                  augment=replace(base.augment, flips=flips, elastic_p=float(elastic), intensity_p=float(intensity)))


def progress_text(progress: RunProgress) -> str:
    """"step 120 of 500, about 3.2 min left" for a :class:`~domain.records.RunProgress`."""
    if progress.phase.startswith("validating"):  # the step does not move meanwhile: say what does
        doing = f", {progress.phase}"
    elif progress.eta_s is not None:
        doing = (f", about {progress.eta_s / 60:.1f} min left" if progress.eta_s >= 90 else
                 f", about {max(1, round(progress.eta_s))} s left")
    elif progress.ended_early:
        doing = f": ended early, {progress.ended_early}"
    else:
        doing = ""
    return f"step {progress.step} of {progress.steps}{doing}"


def resume_note(went_on_from: int, had_reached: int) -> str:
    return (f"Resumed at step {went_on_from} (its latest checkpoint)." if went_on_from else
            f"Started again from step 0: it had reached step {had_reached} but stopped before its first checkpoint.")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def checkpoint_label(c: CheckpointInfo, with_run: bool = True) -> str:
    """"run 3 (cpu-quick) · best at step 400 · pixel error 0.081 · Rand-F 0.912"; the shipped model is
    "starter model (membranes, trained on ISBI 2012)"."""
    named = f"{c.name} · " if c.name else ""
    if c.run_kind == RunKind.STARTER:
        return named + "starter model (membranes, trained on ISBI 2012)"
    if c.run_kind == RunKind.IMPORTED:
        return named + f"imported model (run {c.run_id})"
    scores = " · ".join(f"{name} {c.metrics[key]:.3f}" for key, name in
                        (("val_pixel_error", "pixel error"), ("val_rand_f", "Rand-F")) if key in c.metrics)
    head = f"run {c.run_id} ({c.preset or 'custom'}) · " if with_run else ""
    if c.kind == CheckpointKind.BEST and not any(key.startswith("val_") for key in c.metrics):
        return named + f"{head}final weights at step {c.step} (not validated: the run had no validation slices)"
    return named + f"{head}{c.kind} at step {c.step}" + (f" · {scores}" if scores else "")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else str(v)
    return out


def compare_recipes(runs: list[RunInfo]) -> tuple[list[dict[str, str]], int]:
    """One row per setting with a column per run (``config`` and ``preset`` of each), the settings that
    differ first and marked; and how many differ."""
    flat = {f"run {r.id}": _flat({**r.config, "preset": r.preset}) for r in runs}
    keys = sorted({k for f in flat.values() for k in f})
    rows = [{"setting": k, **{name: f.get(k, "") for name, f in flat.items()}} for k in keys]
    for row in rows:
        row["differs"] = "●" if len({row[name] for name in flat}) > 1 else ""
    rows.sort(key=lambda row: row["differs"] != "●")
    return rows, sum(row["differs"] == "●" for row in rows)


def default_checkpoint(checkpoints: list[CheckpointInfo], runs: list[RunInfo], dataset_id: int,
                       promoted: int | None = None) -> int | None:
    """The checkpoint a prediction (or a live session) of a dataset starts from: the model promoted to be
    its default, else the newest run trained on it, else the starter model (a new dataset's first
    prediction needs no training), else the newest of all."""
    if promoted is not None and any(c.id == promoted for c in checkpoints):
        return promoted
    trained_here = {r.id for r in runs if dataset_id in r.dataset_ids}
    for c in checkpoints:  # newest run first
        if c.run_id in trained_here:
            return c.id
    starter = next((c.id for c in checkpoints if c.run_kind == RunKind.STARTER), None)
    return starter if starter is not None else (checkpoints[0].id if checkpoints else None)


SCORE_KEYS = (("pixel_error", "pixel error"), ("rand_f", "Rand-F"), ("vi", "VI"))


def _delta(value: float | None, reference: dict[str, float] | None, key: str) -> str:
    if value is None or not reference or key not in reference:
        return ""
    return f"{value - reference[key]:+.4f}"


def seen_words(frozen: HeldOut) -> str:
    """What freezing these slices means for runs that already trained on them (``HeldOut.seen_by``)."""
    if not frozen.seen_by:
        return ""
    parts = [f"slice {z} by run{'s' if len(runs) > 1 else ''} {', '.join(map(str, runs))}"
             for z, runs in sorted(frozen.seen_by.items())]
    return (" Already trained on: " + "; ".join(parts) + ". Their held-out scores leave those "
            "slices out, and they are not compared for the best.")


def score_summary(scores: list[Score], name: Callable[[int], str]) -> str:
    """The held-out table in a sentence or two (Markdown): which run is best, by which metric, on which
    slices, and which runs were left out of the choice because they trained on a held-out slice."""
    if not scores:
        return ""
    labels = dict(SCORE_KEYS)
    best = next((s for s in scores if s.best_run_id == s.run_id), None)
    parts = []
    if best is not None:
        by = best.decides
        value = best.metrics.get(by)
        figure = f"{labels[by]} {value:.4f} " if value is not None else ""
        parts.append(f"★ **Best by {labels[by]}: {name(best.run_id)}** ({figure}on held-out slices "
                     f"{', '.join(map(str, best.slices))}, none of which it trained on)."
                     + (f" No held-out slice outlines two neurons whole, so {labels[DECIDES]} could not "
                        "decide." if by != DECIDES else ""))
    else:
        parts.append("No run is marked best: every scored run trained on a held-out slice.")
    tainted = [s for s in scores if s.seen]
    if tainted:
        parts.append("Left out of the choice, because they trained on held-out slices: " + "; ".join(
            f"**{name(s.run_id)}** (trained on {', '.join(map(str, s.seen))}; "
            + (f"its figures count only slices {', '.join(map(str, s.slices))})" if s.slices else "no figures)")
            for s in tainted) + ".")
    return " ".join(parts)


def score_rows(scores: list[Score], name: Callable[[int], str]) -> list[dict[str, Any]]:
    """Held-out scores as table rows: each metric, its change against the parent and the best, and a flag
    when the run is worse than its parent (⚠) or than the best (▼) beyond the tolerance."""
    rows = []
    for s in scores:
        row: dict[str, Any] = {"run": name(s.run_id), "measured on slices": ", ".join(map(str, s.slices)) or "none",
                               "left out: it trained on them": ", ".join(map(str, s.seen))}
        for key, label in SCORE_KEYS:
            value = s.metrics.get(key)
            row[label] = round(value, 4) if value is not None else None
            row[f"{label} vs parent"] = _delta(value, s.parent, key)
            row[f"{label} vs best"] = _delta(value, s.best, key)
        flags = []
        if s.worse_than_parent:
            flags.append("⚠ worse than its parent (" + ", ".join(dict(SCORE_KEYS)[k] for k in s.worse_than_parent)
                         + ")")
        if s.worse_than_best:
            flags.append(f"▼ below the best ({name(s.best_run_id)})")
        if s.best_run_id == s.run_id:
            flags.append(f"★ best by {dict(SCORE_KEYS)[s.decides]}")
        if s.seen:
            flags.append("saw " + ("every held-out slice: no score" if not s.slices else
                                   "some held-out slices: not compared for the best"))
        row["flag"] = "; ".join(flags)
        rows.append(row)
    return rows


def scored_message(run_name: str, written: int, scores: list[Score],
                   dataset_name: Callable[[int], str]) -> tuple[str, str]:
    """(what to tell the user after "Score on the held-out slices", success / info): which slices each new
    score counts, or that the run trained on every held-out slice and so has no figure (a score was still
    written: the table says why it is empty)."""
    if not written:
        return f"{run_name}: nothing new to score (its scores are up to date).", "info"
    parts, empty = [], []
    for s in scores:
        if s.slices:
            left_out = f" (left out, it trained on them: {', '.join(map(str, s.seen))})" if s.seen else ""
            parts.append(f"held-out slices {', '.join(map(str, s.slices))} of {dataset_name(s.dataset_id)}{left_out}")
        else:
            empty.append(f"{dataset_name(s.dataset_id)} (it trained on {', '.join(map(str, s.seen))})")
    said = [f"{run_name} scored on " + "; ".join(parts) + "."] if parts else []
    if empty:
        said.append(f"No figure on {', '.join(empty)}: {run_name} trained on every held-out slice there. "
                    "Hold out slices it never trained on (Datasets) to score it.")
    return " ".join(said) or f"{run_name}: scored.", "success" if parts else "info"
