from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from visionflow.kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    overrides: list,
    run_id: str,
    dataset: Input[Dataset],
    model: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
):
    """The task's test metrics, per-class figures, a picture, and the quality gate.

    Args:
        overrides: Hydra overrides for this run.
        run_id: The run's id.
        dataset: The prepared dataset (its test split is used).
        model: The checkpoint to evaluate.
        evaluation: Points at the evaluation picture; its file holds the evaluate step's result
            (scores, the gate's verdict), for register.
        metrics: The task's test metrics (accuracy; mAP; mIoU) and per-class figures.
        confusion: The confusion matrix, for the Kubeflow UI (classification with at most
            MAX_LABELLED_CLASSES classes; the report lists the top confusions for any count).
        report: The evaluation picture and the per-class table.
    """
    from visionflow.kfp.io import step_config, uri_of, write_pointer
    from visionflow.kfp.reports import evaluation_html
    from visionflow.retry import retrying
    from visionflow.steps.evaluate import evaluate as run
    from visionflow.vision.metrics import MAX_LABELLED_CLASSES

    cfg = step_config(overrides, run_id)
    r = retrying(run)(cfg, dataset_id=dataset.metadata["dataset_id"], checkpoint_uri=uri_of(model))
    write_pointer(evaluation, r.figure_png, r, metric=r.metric, score=r.score, gate=r.gate)
    for name, value in r.metrics.items():
        metrics.log_metric("test_" + name.replace("/", "_"), value)
    metrics.log_metric("gate_passed", float(r.gate_passed))
    if r.confusion is not None and len(r.classes) <= MAX_LABELLED_CLASSES:
        confusion.log_confusion_matrix(r.classes, r.confusion)
    with open(report.path, "w") as f:
        f.write(evaluation_html(cfg, r))
