"""Sparse feature circuits: one import for everything a user touches.

    import sfc

    model = sfc.load_model("smollm2-135m")
    dicts = sfc.load_dictionaries(model)
    task = sfc.load_task("across_rc", model.tokenizer, n_train=32, n_test=40)
    ...

Names are imported on first use, so ``import sfc`` and ``sfc --help`` stay fast.
The pipeline behind them, one way: ``attribution`` (model, dictionaries, effects)
< ``circuits`` (tasks, graph) < ``ablation`` (evaluation, SHIFT) < ``viz`` (pages)
< ``sfc`` (this facade, the ``discover`` job and the command line).
"""

from attribution.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    # the model and its dictionaries
    "load_model": "attribution.model.loading",
    "SFCModel": "attribution.model.wrapper",
    "load_dictionaries": "attribution.dictionaries.sets",
    "DictionarySet": "attribution.dictionaries.sets",
    "LazyDictionarySet": "attribution.dictionaries.sets",
    "build_dictionaries": "attribution.dictionaries.store",
    "TrainConfig": "attribution.dictionaries.training",
    "random_sae": "attribution.dictionaries.kinds",
    "calibrate_sparsity": "attribution.dictionaries.kinds",
    "tracing": "attribution.model",
    # tasks and metrics
    "load_task": "circuits.tasks",
    "make_task": "circuits.tasks",
    "answer_ids": "circuits.tasks",
    "logit_diff": "attribution.metrics",
    "neg_log_prob": "attribution.metrics",
    # effects (paper Eqs. 2-5)
    "node_effects": "attribution.effects",
    "NodeEffects": "attribution.effects",
    "edge_effects": "attribution.edges",
    "EdgeEffects": "attribution.edges",
    "estimate": "attribution.estimate",
    "Estimate": "attribution.estimate",
    # circuits
    "build_circuit": "circuits.build",
    "circuit_masks": "circuits.build",
    "masks_from_effects": "circuits.masks",
    "Circuit": "circuits.graph",
    "load_circuit": "circuits.graph",
    # evaluation
    "AblationConfig": "ablation.config",
    "faithfulness": "ablation.evaluate",
    "run_with_ablations": "ablation.evaluate",
    "sweep": "ablation.sweep",
    # SHIFT (SPEC §6)
    "ShiftConfig": "ablation.shift.run",
    "run_shift": "ablation.shift.run",
    "prepare_shift": "ablation.shift.run",
    "write_results": "ablation.shift.run",
    "EditedModel": "ablation.shift.edit",
    "synthetic_splits": "ablation.shift.data",
    "make_splits": "ablation.shift.data",
    "load_bias_in_bios": "ablation.shift.data",
    "load_table": "ablation.shift.data",
    "train_probe": "ablation.shift.probe",
    "pooled_activations": "ablation.shift.probe",
    "proxy_judge": "ablation.shift.judge",
    "load_flags": "circuits.flags",
    "write_rank_page": "sfc.shift",
    # pages and figures
    "render_html": "viz.html",
    "compute_dashboards": "viz.dashboards",
    "circuit_dashboards": "viz.dashboards",
    "auto_label": "viz.labels",
    "attach_dashboards": "viz.labels",
    "circuit_figure": "viz.figure",
    "curve_figure": "viz.curves",
    # the main job
    "discover": "sfc.pipeline",
    "DiscoverConfig": "sfc.pipeline",
    "write_outputs": "sfc.pipeline",
    "evaluate": "sfc.pipeline",
    "sweep_curve": "sfc.pipeline",
    "task_accuracy": "sfc.pipeline",
    "load_effects": "sfc.pipeline",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("sfc", _EXPORTS, globals())
