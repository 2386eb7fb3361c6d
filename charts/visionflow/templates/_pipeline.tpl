{{/*
The compiled training pipeline as this release ships and uploads it. It is compiled with the
names of a release called `visionflow` and the default Secret (visionflow/kfp/pipeline.py); here
each step's reference to the env ConfigMap, the cluster-config ConfigMap, the S3 Secret and its
keys is pointed at this release's own, so a run started from the Kubeflow UI with the default
parameters uses this release's MinIO, MLflow and Secret. Nothing else in the file changes
(tests/unit/test_chart.py compares it with the compiled file line by line).
*/}}
{{- define "visionflow.pipeline" -}}
{{- $text := .Files.Get "files/pipeline/training.yaml" }}
{{- if not $text }}
{{- fail "files/pipeline/training.yaml is missing: compile the pipeline into the chart (make compile)" }}
{{- end }}
{{- $names := dict
      "visionflow-env" (include "visionflow.componentName" (list . "env"))
      "visionflow-config" (include "visionflow.componentName" (list . "config"))
      "visionflow-minio" (required "minio.existingSecret is required: the pipeline's steps read the S3 credentials from it" .Values.minio.existingSecret) }}
{{- range $compiled, $own := $names }}
{{- $text = $text | replace (printf "configMapName: %s\n" $compiled) (printf "configMapName: %s\n" $own) }}
{{- $text = $text | replace (printf "secretName: %s\n" $compiled) (printf "secretName: %s\n" $own) }}
{{- $text = $text | replace (printf "constant: %s\n" $compiled) (printf "constant: %s\n" $own) }}
{{- end }}
{{- $text = $text | replace "secretKey: AWS_ACCESS_KEY_ID\n" (printf "secretKey: %s\n" .Values.minio.accessKeyKey) }}
{{- $text = $text | replace "secretKey: AWS_SECRET_ACCESS_KEY\n" (printf "secretKey: %s\n" .Values.minio.secretKeyKey) }}
{{- $text }}
{{- end }}
