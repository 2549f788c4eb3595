"""Runs: every training run with its data, recipe, curves, checkpoints, log, predictions and lineage;
compare runs; delete a run."""

from __future__ import annotations

import streamlit as st

from domain.kinds import CheckpointKind, RunKind, RunStatus
from pages.common import attempt, data_table, flash, start_page
from ui.figures import METRIC_NAMES, run_curves_figure
from ui.text import plain, said_by_job
from ui.training import (
    VAL_KEYS,
    checkpoint_label,
    compare_recipes,
    duration,
    score_rows,
    score_summary,
    scored_message,
)

svc = start_page("Runs")
runs = svc.runs()
if not runs:
    st.info("No runs yet: start one on **Train**.")
    st.page_link("pages/train.py", label="Go to Train", icon=":material/model_training:")
    st.stop()

names = {d.id: d.name for d in svc.datasets()}
checkpoints = {r.id: [] for r in runs}
for c in svc.checkpoint_choices():  # every run's, in one read
    checkpoints.setdefault(c.run_id, []).append(c)
run_of_checkpoint = {c.id: c.run_id for cs in checkpoints.values() for c in cs}
parent_run = {r.id: run_of_checkpoint.get(r.parent_checkpoint_id) for r in runs}
starter_runs = {c.run_id for cs in checkpoints.values() for c in cs if c.run_kind == RunKind.STARTER}


def run_name(run_id: int) -> str:
    return "the starter model" if run_id in starter_runs else f"run {run_id}"


def best_metrics(run_id: int) -> dict:
    best = next((c for c in checkpoints[run_id] if c.kind == CheckpointKind.BEST), None)
    return best.metrics if best else {}


f1, f2 = st.columns(2)
statuses = f1.multiselect("Status", sorted({r.status for r in runs}), key="runs_status")
dataset_filter = f2.selectbox("Dataset", [None, *names], format_func=lambda i: "all" if i is None else names[i],
                              key="runs_dataset")
shown = [r for r in runs if (not statuses or r.status in statuses)
         and (dataset_filter is None or dataset_filter in r.dataset_ids)]
owners = {r.id: r.owner for r in runs}
held = {d: h for d in names if (h := svc.held_out(d)) is not None}
scores_of = {d: svc.held_out_scores(d) for d in held}  # (read once: the table and the section below)
# each run's held-out score (of the dataset chosen above, else of the first it was scored on), honest only:
# a run that trained on a held-out slice has no figure here (the held-out table below says why)
held_out_of: dict[int, dict] = {}
for d in ([dataset_filter] if dataset_filter in held else list(held)):
    for score in scores_of[d]:
        if score.slices and not score.seen:
            held_out_of.setdefault(score.run_id, score.metrics)
data_table([{
    "run": r.id, "status": r.status, "datasets": ", ".join(names.get(d, f"#{d} (deleted)") for d in r.dataset_ids),
    "preset": r.preset, "device": r.device, "owner": owners.get(r.id) or "—",
    "started": r.started.strftime("%Y-%m-%d %H:%M") if r.started else "", "duration": duration(r.duration_s),
    "val pixel error": best_metrics(r.id).get("val_pixel_error"), "val Rand-F": best_metrics(r.id).get("val_rand_f"),
    "val VI": best_metrics(r.id).get("val_vi"), "val V_rand": best_metrics(r.id).get("val_v_rand"),
    "val V_info": best_metrics(r.id).get("val_v_info"),
    "held-out pixel error": held_out_of.get(r.id, {}).get("pixel_error"),
    "held-out Rand-F": held_out_of.get(r.id, {}).get("rand_f"),
    "parent": run_name(parent_run[r.id]) if parent_run[r.id] else ""} for r in shown],
    hide_index=True, key="runs_table")

st.caption("**val**: the run's own validation slices (a live session has none); **held-out**: the dataset's "
           "held-out slices, for runs that never trained on them.")

# --- held-out scores: a retrained model that got worse is flagged ---------------------------------
flagged: dict[int, list[str]] = {}  # run → what it is flagged for, on which dataset
if held:
    with st.container(border=True, key="held_out_scores"):
        ids = list(held)
        scored_on = st.selectbox("Held-out scores of", ids, index=ids.index(dataset_filter) if dataset_filter in ids
                                 else 0, format_func=lambda i: f"{names[i]} (slices "
                                 f"{', '.join(map(str, held[i].slices))}, version {held[i].version})",
                                 key="runs_scores_dataset")
        scores = scores_of[scored_on]
        for s in scores:
            if s.worse_than_parent:
                flagged.setdefault(s.run_id, []).append(names[scored_on])
        if not scores:
            st.caption("No run has been scored on these slices yet: runs that end are scored by themselves; an "
                       "older run can be scored from its page below.")
        else:
            data_table(score_rows(scores, run_name), hide_index=True, key="held_out_table")
            st.markdown(score_summary(scores, run_name))
            bad = [s for s in scores if s.flagged]
            if bad:
                st.warning(" ".join(f"**{run_name(s.run_id)}** scores worse than its parent "
                                    f"({run_name(parent_run[s.run_id]) if parent_run.get(s.run_id) else 'parent'})"
                                    " on the held-out slices." for s in bad), icon=":material/trending_down:")
            promoted = svc.default_model(scored_on)
            candidates = [c for s in scores for c in checkpoints.get(s.run_id, []) if c.kind == CheckpointKind.BEST]
            if candidates:
                best_run = next((s.best_run_id for s in scores if s.best_run_id is not None), None)
                cids = [c.id for c in candidates]
                first = next((c.id for c in candidates if c.run_id == best_run), cids[0])
                cols = st.columns([3, 2], vertical_alignment="bottom")
                pick = cols[0].selectbox("Default model of this dataset (Predict and Live start from it)", cids,
                                         index=cids.index(promoted) if promoted in cids else cids.index(first),
                                         format_func=lambda i: checkpoint_label(next(c for c in candidates
                                                                                     if c.id == i)),
                                         key=f"promote_pick_{scored_on}")
                if cols[1].button("Promote", key="promote", disabled=pick == promoted,
                                  help="Make it the model Predict and Live offer first for this dataset."):
                    promoted_label = plain(checkpoint_label(next(c for c in candidates if c.id == pick)))
                    attempt(lambda: svc.promote(scored_on, pick), lambda _: f"Promoted {promoted_label} to be the "
                            f"default model of {plain(names[scored_on])}.")
                if promoted is not None:
                    st.caption(f"Current default: checkpoint #{promoted}.")

one, compare = st.tabs(["A run", "Compare runs"], key="runs_tab", on_change="rerun")  # (kept across messages)
with one:
    run_id = st.selectbox("Run", [r.id for r in shown] or [r.id for r in runs], key="runs_pick",
                          format_func=lambda i: next(f"run {r.id} · {r.status} · {r.preset}"
                                                     for r in runs if r.id == i))
    run = svc.run(run_id)
    parent, children = svc.lineage(run_id)
    origin = f"{run_name(parent)} → " if parent else "random initialisation → "
    st.markdown(f"**Lineage:** {origin}**run {run.id}**" + (" → " + ", ".join(f"run {c}" for c in children)
                                                            if children else ""))
    if run.error:
        st.error(said_by_job(run.error))
    if run.id in flagged:
        st.warning(f"Run {run.id} scores worse than its parent on the held-out slices of "
                   f"{', '.join(map(plain, flagged[run.id]))}: see the table above before you use it.",
                   icon=":material/trending_down:")
    # the datasets with held-out slices on which this run has no score of their current version
    unscored = [d for d in run.dataset_ids if d in held and not any(s.run_id == run.id for s in scores_of[d])] \
        if run.status == RunStatus.FINISHED else []
    if unscored and st.button("Score on the held-out slices", key=f"score_{run.id}",
                              help="Runs that end are scored by themselves; this scores one that ended before "
                                   "the held-out slices were chosen (or changed)."):
        def _scored(written: int) -> None:
            mine = [s for d in unscored for s in svc.held_out_scores(d) if s.run_id == run.id]
            flash(*scored_message(f"Run {run.id}", written, mine, lambda d: plain(names.get(d, f"dataset {d}"))))

        with st.spinner("Scoring …"):
            attempt(lambda: svc.score_run(run.id), _scored)
    curves = svc.curves(run.id)
    if curves:
        left, right = st.columns(2)
        left.plotly_chart(run_curves_figure({run.id: curves}, ["loss"], "Training loss"), key="run_loss")
        val_keys = [k for k in VAL_KEYS if k in curves]
        if val_keys:
            right.plotly_chart(run_curves_figure({run.id: curves}, val_keys, "Validation"), key="run_val")
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Trained on** (the exact mask versions)")
        data_table([{"role": m.role, "dataset": m.dataset, "slice": m.slice, "version": m.version, "kind": m.kind,
                       "author": m.author, "labelled pixels": m.labelled_pixels} for m in svc.run_masks(run.id)],
                     hide_index=True, height=220, key="run_masks")
    with c2:
        st.markdown("**Recipe**")
        st.json(run.config, expanded=False)
    st.markdown("**Checkpoints**")
    for c in checkpoints[run.id]:
        cols = st.columns([3, 1, 2, 1], vertical_alignment="center")
        cols[0].write(plain(checkpoint_label(c, with_run=False)))
        cols[1].download_button("Download", lambda c=c: svc.checkpoint_bytes(c.id), on_click="ignore",
                                file_name=f"run-{run.id}-{c.kind}.pt", key=f"dl_ckpt_{c.id}")
        cols[2].page_link("pages/models.py", label="Card and BioImage.IO export", icon=":material/deployed_code:")
        refused = svc.refusal("manage", "checkpoint", c.id)  # (the service checks the call again)
        with cols[3].popover("Delete", disabled=run.active or bool(refused), help=refused or None):
            st.warning(f"Delete the {c.kind} checkpoint of run {run.id}, and the predictions made with it?")
            if st.button("Yes, delete it", key=f"del_ckpt_{c.id}", type="primary"):
                attempt(lambda c=c: svc.delete_checkpoint(c.id),
                        lambda removed, c=c: f"Deleted the {c.kind} checkpoint of run {run.id}: {removed.describe()}.")
    if not checkpoints[run.id]:
        st.caption("No checkpoint (yet).")
    made = svc.predictions(run_id=run.id)
    if made:
        st.markdown("**Predictions made with it**")
        data_table([{"prediction": p.id, "dataset": names.get(p.dataset_id, p.dataset_id), "slices": len(p.slices),
                       "status": p.status, "pixel error": (p.metrics or {}).get("mean", {}).get("pixel_error"),
                       "Rand-F": (p.metrics or {}).get("mean", {}).get("rand_f")} for p in made],
                     hide_index=True, key="run_predictions")
    with st.expander("Worker log"):
        st.code(svc.run_log(run.id, lines=200) or "(empty)", language=None)
    with st.expander("Delete this run"):
        preview = svc.run_deletion_preview(run.id)
        st.warning(f"Deleting run {run.id} removes {preview.describe()}: its metrics, checkpoints, log and the "
                   "predictions made with it. Its datasets and mask versions stay.")
        refused = svc.refusal("manage", "run", run.id)  # (the service checks the call again)
        refused = refused or preview.refused
        if refused:
            st.caption(refused)
        elif run.active:
            stop = svc.live_stop if run.kind == RunKind.LIVE else svc.cancel_run
            st.caption("Stop the run first: it is " + ("waiting for the device." if run.status == RunStatus.QUEUED
                                                       else "running."))
            if st.button("Stop the live session" if run.kind == RunKind.LIVE else "Cancel the run",
                         key=f"runs_cancel_{run.id}", disabled=run.cancel_requested):
                attempt(lambda: stop(run.id), lambda _: f"Run {run.id}: asked to stop.")
        sure = st.checkbox(f"Yes, delete run {run.id}", key=f"sure_{run.id}", disabled=bool(refused))
        if st.button("Delete run", type="primary", disabled=not sure or run.active or bool(refused),
                     key=f"delete_run_{run.id}"):
            attempt(lambda: svc.delete_run(run.id), lambda removed: f"Deleted run {run.id}: {removed.describe()}.")

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

        rows, differing = compare_recipes([r for r in runs if r.id in chosen])
        if st.toggle("Only the differences", key="compare_only_diff"):
            rows = [row for row in rows if row["differs"]]
        data_table(rows, hide_index=True, key="compare_configs")
        if differing:
            st.caption(f"{differing} setting(s) differ (marked ●).")
        else:
            st.info("These runs have the same recipe and seed, so their curves lie on top of each other. To see "
                    "how much a result depends on chance, train again with another **Seed** (Train → Knobs).")
