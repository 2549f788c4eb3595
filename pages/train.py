"""Train: choose the data and the recipe, start a run in the background, and follow it live."""

from __future__ import annotations

import streamlit as st

from domain.kinds import RunKind, RunStatus
from domain.records import RunInfo
from pages.common import actor, attempt, can, data_table, select_dataset, selected_dataset, start_page, still_signed_in
from storage.service import UserError
from ui.figures import run_curves_figure
from ui.text import plain, said_by_job
from ui.training import VAL_KEYS, checkpoint_label, describe_preset, progress_text, recipe, resume_note

FOLLOWED = "train_run_id"  # (this page's own key: the run followed, also the one just submitted)
svc = start_page("Train")


def follow(run_id: int, was_active: bool) -> None:
    """The run's state; a fragment polls it from the store every two seconds while the run is queued or
    running, and the page reruns once when it stops (which ends the polling)."""
    if not still_signed_in():
        return
    snap = svc.snapshot(run_id)  # the run, its progress and its curves in one read
    run, progress, curves = snap.run, snap.progress, snap.curves
    head = st.columns([2, 3, 2, 2], vertical_alignment="center")
    head[0].markdown(f"### Run {run.id}")
    head[0].markdown(f"Status: **{run.status}**" + (" (cancel requested)" if run.cancel_requested and
                                                      run.active else ""))
    if run.kind == RunKind.LIVE:  # no end to count towards: what it does now
        doing = run.phase if run.active and run.phase else run.status.lower()  # (an ended one's last phase is old)
        head[1].markdown(f"**Live session** (Annotate) · step {progress.step:,} · {doing}")
    else:
        fraction = progress.step / progress.steps if progress.steps else 0.0
        head[1].progress(min(fraction, 1.0), text=progress_text(progress))
    for went_on_from, had_reached in progress.resumes:
        head[1].caption(resume_note(went_on_from, had_reached))
    if run.status == RunStatus.QUEUED:  # a shared GPU: where this run stands, and whose runs are ahead
        queue = svc.training_queue()
        place = next((q.position for q in queue if q.run_id == run.id), 0)
        ahead = [q for q in queue if q.position < place]  # (running ones have place 0)
        if ahead:
            head[1].caption("Waiting behind " + ", ".join(
                f"run #{q.run_id} ({plain(q.owner or 'system')}{', running' if q.position == 0 else ''})"
                for q in ahead))
    # what the user may not do to this run is shown disabled, with the reason (the service checks again)
    refused = svc.refusal("train") if run.kind == RunKind.LIVE else svc.refusal("manage", "run", run.id)
    if run.active and run.kind == RunKind.LIVE:
        if head[2].button("Stop", key=f"stop_live_{run.id}", disabled=run.cancel_requested or bool(refused),
                          help=refused or "End the live session for everyone: it becomes a run with its checkpoints."):
            attempt(lambda: svc.live_stop(run.id), rerun="fragment")
    elif run.active:
        if head[2].button("Cancel", key=f"cancel_{run.id}", disabled=run.cancel_requested or bool(refused),
                          help=refused or None):
            attempt(lambda: svc.cancel_run(run.id), rerun="fragment")
    elif run.status in (RunStatus.CANCELLED, RunStatus.FAILED, RunStatus.LOST) and head[2].button(
            "Resume", key=f"resume_{run.id}", help=refused or "Continue from its latest checkpoint",
            disabled=bool(refused)):
        attempt(lambda: svc.resume_run(run.id))
    head[3].page_link("pages/runs.py", label="All runs", icon=":material/monitoring:")
    if run.error and run.status in (RunStatus.FAILED, RunStatus.LOST):
        st.error(said_by_job(run.error))
    if curves:
        left, right = st.columns(2)
        left.plotly_chart(run_curves_figure({run.id: curves}, ["loss"], "Training loss"), key=f"loss_{run.id}")
        val_keys = [k for k in VAL_KEYS if k in curves]
        if val_keys:
            right.plotly_chart(run_curves_figure({run.id: curves}, val_keys, "Validation"), key=f"val_{run.id}")
        elif run.kind == RunKind.TRAIN and not run.spec.get("val"):
            right.caption("No validation curve: this run has no validation slices. Its last weights are kept as "
                          "its final checkpoint.")
        elif run.kind == RunKind.LIVE:
            right.caption("No validation curve: a live session learns from every saved mask as it comes. Predict "
                          "scores its checkpoints on the slices you choose.")
        elif not run.active:
            right.caption("No validation curve: the run ended before its first validation.")
        else:
            right.caption("Validation metrics appear after the first validation.")
    with st.expander("Worker log (last lines)", expanded=run.status == RunStatus.FAILED):
        st.code(svc.run_log(run.id) or "(empty so far)", language=None)
    if was_active and not run.active:
        st.rerun()  # the run stopped: rerun the page, whose fragment no longer polls


# --- the data -------------------------------------------------------------------------------------
datasets = [d for d in svc.datasets() if d.labelled_slices > 0]
overview = svc.overview()
if not overview.gpu:
    st.info(f"No GPU here: training runs on the CPU ({overview.device.removeprefix('CPU only ').strip('()')}).")
else:
    st.success(f"Training runs on **{overview.device}**.")

runs = svc.runs()
followed = st.session_state.get(FOLLOWED)
if followed is None or followed not in {r.id for r in runs}:
    # the run to show: running before waiting, this user's before others', newest first (runs come so)
    active = sorted((r for r in runs if r.active), key=lambda r: (r.status != RunStatus.RUNNING,
                                                                   r.owner_id != actor().user_id))
    followed = (active or runs or [None])[0]
    followed = followed.id if followed is not None else None

if not datasets:
    st.info("No dataset has labelled slices yet: load the demo on the home page, upload labels on **Datasets**, "
            "or paint a few slices on **Annotate**.")
else:
    with st.expander("New training run", expanded=followed is None or not any(r.active for r in runs)):
        selected = selected_dataset(svc.datasets())  # the dataset chosen on any page

        def _chosen() -> None:
            if len(st.session_state["train_datasets"]) == 1:
                select_dataset(st.session_state["train_datasets"][0])

        chosen = st.multiselect("Datasets", [d.id for d in datasets],
                                default=[selected if selected in {d.id for d in datasets} else datasets[-1].id],
                                format_func={d.id: f"{d.name} (#{d.id}, {d.labelled_slices} labelled slices)"
                                             for d in datasets}.get, key="train_datasets", on_change=_chosen)
        train_parts, val_parts, problems = [], [], []
        for dataset_id in chosen:
            info = next(d for d in datasets if d.id == dataset_id)
            default_train, default_val = svc.default_split(dataset_id)
            c1, c2 = st.columns(2)
            t_text = c1.text_input(f"Training slices of {plain(info.name)}", ",".join(map(str, default_train)),
                                   key=f"train_slices_{dataset_id}", help="e.g. 0-24 or 0,2,5-9")
            v_text = c2.text_input(f"Validation slices of {plain(info.name)}", ",".join(map(str, default_val)),
                                   key=f"val_slices_{dataset_id}")
            try:
                t_slices = svc.parse_slices(t_text, info.shape[0]) if t_text.strip() else []
                v_slices = svc.parse_slices(v_text, info.shape[0]) if v_text.strip() else []
            except ValueError as exc:
                problems.append(f"{plain(info.name)}: {plain(exc)}")
                continue
            if set(t_slices) & set(v_slices):
                problems.append(f"{plain(info.name)}: slices {sorted(set(t_slices) & set(v_slices))} are on both sides")
            if t_slices:
                train_parts.append({"dataset_id": dataset_id, "slices": t_slices})
            if v_slices:
                val_parts.append({"dataset_id": dataset_id, "slices": v_slices})
        plan = svc.train_plan(train_parts, val_parts)
        problems += [f"{plain(r.dataset)}: slice {r.slice} has no mask yet" for r in plan if r.version == "none"]
        if plan:
            sides = {role: sum(r.labelled_pixels for r in plan if r.role == role) for role in ("train", "val")}
            st.caption(f"Training: {sum(r.role == 'train' for r in plan)} slices, {sides['train']:,} labelled "
                       f"pixels · validation: {sum(r.role == 'val' for r in plan)} slices, {sides['val']:,} "
                       "labelled pixels. These exact mask versions are recorded with the run:")
            data_table([{"role": r.role, "dataset": r.dataset, "slice": r.slice, "version": r.version,
                           "kind": r.kind, "labelled pixels": r.labelled_pixels} for r in plan],
                         hide_index=True, height=min(250, 40 + 35 * len(plan)), key="train_plan")

        presets = svc.presets()
        names = list(presets)
        # what this user trained with last (a reload of the page forgets the form), else the device's recipe
        mine = [r for r in runs if r.kind == RunKind.TRAIN and r.owner_id == actor().user_id and r.preset in names]
        default_preset = max(mine, key=lambda r: r.id).preset if mine else "gpu" if overview.gpu else "cpu-quick"
        preset_name = st.radio("Preset", names, index=names.index(default_preset), horizontal=True, key="train_preset",
                               captions=[describe_preset(n) for n in names])
        base = presets[preset_name]
        with st.expander("Knobs"):
            k = st.columns(4)
            width = k[0].select_slider("Width", [4, 8, 16, 32, 64], base.model.initial_features,
                                       key=f"k_width_{preset_name}")
            depth = k[0].slider("Depth", 1, 5, base.model.depth, key=f"k_depth_{preset_name}")
            padding = k[1].radio("Padding", ["same", "valid"], ["same", "valid"].index(base.model.padding),
                                 key=f"k_padding_{preset_name}", horizontal=True)
            patch = k[1].number_input("Patch size", 32, 1024, base.patch_size, 16, key=f"k_patch_{preset_name}")
            batch = k[2].number_input("Batch size", 1, 64, base.batch_size, key=f"k_batch_{preset_name}")
            steps = k[2].number_input("Steps", 1, 200_000, base.steps, key=f"k_steps_{preset_name}")
            lr = k[3].number_input("Learning rate", 1e-5, 0.5, float(base.lr), format="%.4f", key=f"k_lr_{preset_name}")
            loss = k[3].selectbox("Loss", ["bce+dice", "bce", "dice"], ["bce+dice", "bce", "dice"].index(base.loss),
                                  key=f"k_loss_{preset_name}")
            a = st.columns(4)
            flips = a[0].toggle("Flips and rotations", base.augment.flips, key=f"k_flips_{preset_name}")
            elastic = a[1].slider("Elastic deformation (share of patches)", 0.0, 1.0, base.augment.elastic_p,
                                  key=f"k_elastic_{preset_name}")
            intensity = a[2].slider("Brightness/contrast/gamma (share)", 0.0, 1.0, base.augment.intensity_p,
                                    key=f"k_intensity_{preset_name}")
            budget = a[3].number_input("Time budget (min, 0 = none)", 0.0, 10_000.0,
                                       (base.max_seconds or 0) / 60, key=f"k_budget_{preset_name}")
            seed = a[3].number_input("Seed", 0, 2**31 - 1, base.seed, key=f"k_seed_{preset_name}",
                                     help="Initial weights and patch sampling. Two runs of one recipe and one "
                                          "seed train alike; change it to see how much a result depends on luck.")
        checkpoints = svc.checkpoint_choices()
        by_id = {c.id: c for c in checkpoints}
        parent = st.selectbox("Start from (fine-tune)", [None, *by_id], key="train_parent",
                              format_func=lambda i: checkpoint_label(by_id[i]) if i else "random initialisation")
        config = None
        try:
            config = recipe(preset_name, width=width, depth=depth, padding=padding, patch=patch, batch=batch,
                            steps=steps, lr=lr, loss=loss, flips=flips, elastic=elastic, intensity=intensity,
                            budget_min=budget, seed=seed)
        except (ValueError, TypeError) as exc:
            problems.append(f"recipe: {plain(exc)}")
        if config is not None and train_parts:
            try:
                with st.spinner("Timing this network on this machine …"):
                    st.caption(f"This run takes {svc.training_estimate(config, val_parts)} (measured for this "
                               "network on this machine, for these slices).")
            except UserError as exc:
                problems.append(f"device: {plain(exc)}")
        for problem in problems:
            st.error(problem)
        if train_parts and not val_parts and not problems:
            st.warning("No validation slices: nothing measures this run while it trains, nothing picks its best "
                       "step, and Runs cannot compare it with others. Its last weights are kept. Name a labelled "
                       "slice or two under Validation slices (not used for training) to measure it.",
                       icon=":material/rule:")
        elif train_parts and not problems and (note := svc.validation_note(val_parts)):
            st.warning(note, icon=":material/rule:")
        if st.button("Train", type="primary", disabled=bool(problems) or not train_parts or config is None
                     or not can("train"),
                     key="train_submit"):
            def submitted(run: RunInfo) -> str:
                st.session_state[FOLLOWED] = run.id
                return f"Run {run.id} submitted ({run.status})."

            attempt(lambda: svc.submit_training(train_parts, val_parts, config, preset=preset_name,
                                                parent_checkpoint_id=parent),
                    submitted, failed=lambda exc: f"Not started: {plain(exc)}")

if followed is not None:
    active_now = svc.run(followed).active
    st.fragment(follow, run_every=2.0 if active_now else None)(followed, active_now)
