from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from visionflow.kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare(overrides: list, run_id: str, dataset: Output[Dataset], report: Output[Markdown]):
    """Validate, split and shard the images; write shards and manifest to the artifact store.

    Args:
        overrides: Hydra overrides for this run.
        run_id: The run's id.
        dataset: Points at the dataset (its store prefix); metadata holds counts and classes.
        report: Split sizes and the files that were skipped as unusable.
    """
    from visionflow.kfp.io import step_config, write_pointer
    from visionflow.kfp.reports import prepare_report
    from visionflow.retry import retrying
    from visionflow.steps.prepare import prepare as run

    r = retrying(run)(step_config(overrides, run_id))
    m = r.manifest
    write_pointer(dataset, r.uri, dataset_id=r.dataset_id, classes=m["classes"],
                  counts={s: m["splits"][s]["count"] for s in m["splits"]},
                  bad_files=len(m["bad_files"]))  # fmt: skip
    with open(report.path, "w") as f:
        f.write(prepare_report(m))
