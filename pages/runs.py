"""Runs: every training run with its data, recipe, curves, checkpoints, log, predictions and lineage;
compare runs; delete a run."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from pages.common import METRIC_NAMES, flash, frame_guard, run_curves_figure, service, show_flashes
from storage.service import UserError

frame_guard()
svc = service()
st.title("Runs")
show_flashes()
runs = svc.runs()
if not runs:
    st.info("No runs yet: start one on **Train**.")
    st.page_link("pages/train.py", label="Go to Train", icon=":material/model_training:")
    st.stop()

names = {d.id: d.name for d in svc.datasets()}
checkpoints = {r.id: svc.checkpoints(r.id) for r in runs}
parent_run = {}
for r in runs:
    parent_run[r.id] = next((rid for rid, cs in checkpoints.items() for c in cs if c["id"] == r.parent_checkpoint_id),
                            None)


def best_metrics(run_id: int) -> dict:
    best = next((c for c in checkpoints[run_id] if c["kind"] == "best"), None)
    return best["metrics"] if best else {}


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


f1, f2 = st.columns(2)
statuses = f1.multiselect("Status", sorted({r.status for r in runs}), key="runs_status")
dataset_filter = f2.selectbox("Dataset", [None, *names], format_func=lambda i: "all" if i is None else names[i],
                              key="runs_dataset")
shown = [r for r in runs if (not statuses or r.status in statuses)
         and (dataset_filter is None or dataset_filter in r.dataset_ids)]
st.dataframe([{
    "run": r.id, "status": r.status, "datasets": ", ".join(names.get(d, f"#{d} (deleted)") for d in r.dataset_ids),
    "preset": r.spec.get("preset", ""), "device": r.device,
    "started": r.started.strftime("%Y-%m-%d %H:%M") if r.started else "", "duration": duration(r.duration_s),
    "val pixel error": best_metrics(r.id).get("val_pixel_error"), "val Rand-F": best_metrics(r.id).get("val_rand_f"),
    "val VI": best_metrics(r.id).get("val_vi"),
    "parent": f"run {parent_run[r.id]}" if parent_run[r.id] else ""} for r in shown],
    hide_index=True, key="runs_table")

one, compare = st.tabs(["A run", "Compare runs"])
with one:
    run_id = st.selectbox("Run", [r.id for r in shown] or [r.id for r in runs], key="runs_pick",
                          format_func=lambda i: next(f"run {r.id} · {r.status} · {r.spec.get('preset', '')}"
                                                     for r in runs if r.id == i))
    run = svc.run(run_id)
    parent, children = svc.lineage(run_id)
    st.markdown("**Lineage:** " + (f"run {parent} → " if parent else "random initialisation → ") + f"**run {run.id}**"
                + (" → " + ", ".join(f"run {c}" for c in children) if children else ""))
    if run.error:
        st.error(run.error.strip().splitlines()[-1])
    curves = svc.curves(run.id)
    if curves:
        left, right = st.columns(2)
        left.plotly_chart(run_curves_figure({run.id: curves}, ["loss"], "Training loss"), key="run_loss")
        val_keys = [k for k in ("val_loss", "val_pixel_error", "val_dice", "val_rand_f", "val_vi") if k in curves]
        if val_keys:
            right.plotly_chart(run_curves_figure({run.id: curves}, val_keys, "Validation"), key="run_val")
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Trained on** (the exact mask versions)")
        st.dataframe([{k: m[k] for k in ("role", "dataset", "slice", "version", "kind", "author", "labelled_pixels")}
                      for m in svc.run_masks(run.id)], hide_index=True, height=220, key="run_masks")
    with c2:
        st.markdown("**Recipe**")
        st.json(run.config, expanded=False)
    st.markdown("**Checkpoints**")
    for c in checkpoints[run.id]:
        cols = st.columns([3, 1, 1], vertical_alignment="center")
        scores = ", ".join(f"{METRIC_NAMES.get(k, k)} {v:.3f}" for k, v in c["metrics"].items() if k.startswith("val_"))
        cols[0].write(f"{c['kind']} at step {c['step']}" + (f" · {scores}" if scores else ""))
        cols[1].download_button("Download", lambda c=c: svc.checkpoint_bytes(c["id"]), on_click="ignore",
                                file_name=f"run-{run.id}-{c['kind']}.pt", key=f"dl_ckpt_{c['id']}")
        with cols[2].popover("Delete", disabled=run.status in ("QUEUED", "RUNNING")):
            st.warning(f"Delete the {c['kind']} checkpoint of run {run.id}, and the predictions made with it?")
            if st.button("Yes, delete it", key=f"del_ckpt_{c['id']}", type="primary"):
                try:
                    removed = svc.delete_checkpoint(c["id"])
                except UserError as exc:
                    st.error(str(exc))
                else:
                    flash(f"Deleted the {c['kind']} checkpoint of run {run.id} ({removed} file(s)).")
                    st.rerun()
    if not checkpoints[run.id]:
        st.caption("No checkpoint (yet).")
    made = svc.predictions(run_id=run.id)
    if made:
        st.markdown("**Predictions made with it**")
        st.dataframe([{"prediction": p.id, "dataset": names.get(p.dataset_id, p.dataset_id), "slices": len(p.slices),
                       "status": p.status, "pixel error": (p.metrics or {}).get("mean", {}).get("pixel_error"),
                       "Rand-F": (p.metrics or {}).get("mean", {}).get("rand_f")} for p in made],
                     hide_index=True, key="run_predictions")
    with st.expander("Worker log"):
        st.code(svc.run_log(run.id, lines=200) or "(empty)", language=None)
    with st.expander("Delete this run"):
        preview = svc.run_deletion_preview(run.id)
        st.warning(f"Deleting run {run.id} removes {preview.describe()}: its metrics, checkpoints, log and the "
                   "predictions made with it. Its datasets and mask versions stay.")
        if run.status in ("QUEUED", "RUNNING"):
            st.caption("Cancel the run first (on **Train**).")
        sure = st.checkbox(f"Yes, delete run {run.id}", key=f"sure_{run.id}")
        if st.button("Delete run", type="primary", disabled=not sure or run.status in ("QUEUED", "RUNNING"),
                     key=f"delete_run_{run.id}"):
            try:
                removed = svc.delete_run(run.id)
            except UserError as exc:
                st.error(str(exc))
            else:
                flash(f"Deleted run {run.id}: {removed.describe()}.")
                st.rerun()

with compare:
    chosen = st.multiselect("Runs to compare", [r.id for r in runs], default=[r.id for r in runs[:2]],
                            key="compare_runs")
    if len(chosen) < 2:
        st.caption("Choose two or more runs.")
    else:
        all_curves = {rid: svc.curves(rid) for rid in chosen}
        keys = sorted({k for c in all_curves.values() for k in c}, key=lambda k: (k != "loss", k))
        metric = st.selectbox("Curve", keys, format_func=lambda k: METRIC_NAMES.get(k, k), key="compare_metric")
        st.plotly_chart(run_curves_figure(all_curves, [metric], METRIC_NAMES.get(metric, metric)), key="compare_chart")

        def flat(d: dict, prefix: str = "") -> dict:
            out = {}
            for k, v in d.items():
                if isinstance(v, dict):
                    out.update(flat(v, f"{prefix}{k}."))
                else:
                    out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
            return out

        configs = {f"run {rid}": flat({**next(r for r in runs if r.id == rid).config,
                                       "preset": next(r for r in runs if r.id == rid).spec.get("preset", "")})
                   for rid in chosen}
        table = pd.DataFrame(configs).astype(str)
        differs = table.nunique(axis=1) > 1
        only = st.toggle("Only the differences", key="compare_only_diff")
        table = table[differs] if only else table
        highlight = lambda row: ["background-color: #fff3b0" if differs[row.name] else ""] * len(row)  # noqa: E731
        st.dataframe(table.style.apply(highlight, axis=1), key="compare_configs")
        if differs.any():
            st.caption(f"{int(differs.sum())} setting(s) differ (highlighted).")
        else:
            st.info("These runs have the same recipe and seed, so their curves lie on top of each other. To see "
                    "how much a result depends on chance, train again with another **Seed** (Train → Knobs).")
