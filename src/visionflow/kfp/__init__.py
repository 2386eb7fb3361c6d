"""Everything Kubeflow Pipelines: components, the pipeline DAG, compiling, local runs, submitting.

- `components/`: one KFP component per step; each body builds the config and calls one step.
- `pipeline`: the training DAG and how its tasks are wired to the cluster (kfp-kubernetes).
- `batch_pipeline`: the batch inference DAG (configure → predict), wired the same way.
- `compile`: the YAML that `make compile` writes (pipelines/, components/, the chart's files/).
- `io`: what components share: the config from the pipeline's parameters, artifact pointers.
- `params`: what a run's parameters may say (the allow-list configure and submit check).
- `reports`: what the Kubeflow UI shows for each step.
- `local`: a whole pipeline (training or batch inference) on this machine with kfp.local.
- `submit`: upload to and run on a Kubeflow Pipelines server.
- `sweep`: one run per combination of Hydra sweep overrides (`pipeline run|submit -m`).
"""
