{{/*
A compiled pipeline as this release ships and uploads it: (list . "<name>") for
files/pipeline/<name>.yaml. The pipelines are compiled with the names of a release called
`visionflow` and the default Secret (visionflow/kfp/pipeline.py, batch_pipeline.py); here each
step's reference to the env ConfigMap, the cluster-config ConfigMap, the S3 Secret and its keys is
pointed at this release's own, so a run started from the Kubeflow UI with the default parameters
uses this release's MinIO, MLflow and Secret. Nothing else in the file changes
(tests/unit/test_chart.py compares it with the compiled file line by line).
*/}}
{{- define "visionflow.pipeline" -}}
{{- $root := index . 0 }}
{{- $file := printf "files/pipeline/%s.yaml" (index . 1) }}
{{- $text := $root.Files.Get $file }}
{{- if not $text }}
{{- fail (printf "%s is missing: compile the pipelines into the chart (make compile)" $file) }}
{{- end }}
{{- $names := dict
      "visionflow-env" (include "visionflow.componentName" (list $root "env"))
      "visionflow-config" (include "visionflow.componentName" (list $root "config"))
      "visionflow-minio" (required "minio.existingSecret is required: the pipeline's steps read the S3 credentials from it" $root.Values.minio.existingSecret) }}
{{- range $compiled, $own := $names }}
{{- $text = $text | replace (printf "configMapName: %s\n" $compiled) (printf "configMapName: %s\n" $own) }}
{{- $text = $text | replace (printf "secretName: %s\n" $compiled) (printf "secretName: %s\n" $own) }}
{{- $text = $text | replace (printf "constant: %s\n" $compiled) (printf "constant: %s\n" $own) }}
{{- end }}
{{- $text = $text | replace "secretKey: AWS_ACCESS_KEY_ID\n" (printf "secretKey: %s\n" $root.Values.minio.accessKeyKey) }}
{{- $text = $text | replace "secretKey: AWS_SECRET_ACCESS_KEY\n" (printf "secretKey: %s\n" $root.Values.minio.secretKeyKey) }}
{{- $text }}
{{- end }}

{{/*
The pipelines the chart ships (files/pipeline/<file>.yaml, key pipeline-<file>.yaml of the kfp
ConfigMap) and the Kubeflow pipeline each is uploaded as, in upload order: a JSON list of
{file, name}; read it with `include "visionflow.pipelines" . | fromJsonArray`.
*/}}
{{- define "visionflow.pipelines" -}}
{{- $upload := .Values.kfp.upload }}
{{- if and $upload.enabled (eq $upload.pipelineName $upload.batchPipelineName) }}
{{- fail (printf "kfp.upload.pipelineName and kfp.upload.batchPipelineName are both %q: each pipeline needs a name of its own" $upload.pipelineName) }}
{{- end }}
{{- list
      (dict "file" "training" "name" $upload.pipelineName)
      (dict "file" "batch_inference" "name" $upload.batchPipelineName) | toJson }}
{{- end }}
