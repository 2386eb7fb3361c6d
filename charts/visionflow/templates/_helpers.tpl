{{/* The chart name, cut to 63 characters (a DNS label). */}}
{{- define "visionflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name: <release>-<chart>, or the release name alone when it already contains the chart
name; cut to 63 characters because some Kubernetes name fields are limited to that (DNS labels).
*/}}
{{- define "visionflow.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The name of one part of the release: (list $ "mlflow") -> <fullname>-mlflow, within 63 characters. */}}
{{- define "visionflow.componentName" -}}
{{- $ctx := index . 0 }}
{{- $suffix := index . 1 }}
{{- $prefix := include "visionflow.fullname" $ctx | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix $suffix }}
{{- end }}

{{/*
The name of a cluster-scoped part of the release: (list $ "jobs") -> <fullname>-<namespace>-jobs,
so that releases of one name in two namespaces do not collide. Past 63 characters the
<fullname>-<namespace> part is cut and a hash of the whole name keeps it unique.
*/}}
{{- define "visionflow.clusterScopedName" -}}
{{- $ctx := index . 0 }}
{{- $suffix := index . 1 }}
{{- $base := printf "%s-%s" (include "visionflow.fullname" $ctx) $ctx.Release.Namespace }}
{{- $full := printf "%s-%s" $base $suffix }}
{{- if le (len $full) 63 }}
{{- $full }}
{{- else }}
{{- $cut := $base | trunc (int (sub 53 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s-%s" $cut (sha256sum $full | trunc 8) $suffix }}
{{- end }}
{{- end }}

{{/* chart label: name-version. */}}
{{- define "visionflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "visionflow.labels" -}}
helm.sh/chart: {{ include "visionflow.chart" . }}
{{ include "visionflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: visionflow
{{- end }}

{{/* Selector labels: stable across upgrades. Add app.kubernetes.io/component per workload. */}}
{{- define "visionflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "visionflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The service account visionflow's steps and the upload hook run as. */}}
{{- define "visionflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "visionflow.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: (list $ .Values.image). The tag defaults to
the chart's appVersion; a digest, when given, pins the exact image.
*/}}
{{- define "visionflow.image" -}}
{{- $ctx := index . 0 }}
{{- $img := index . 1 }}
{{- $tag := toString (default $ctx.Chart.AppVersion $img.tag) }}
{{- if or (eq $tag "latest") (eq $tag "") }}
{{- fail (printf "image %s: a fixed version tag is required, not %q" $img.repository $tag) }}
{{- end }}
{{- if $img.digest }}
{{- printf "%s:%s@%s" $img.repository $tag $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository $tag }}
{{- end }}
{{- end }}

{{/*
checkov skips for an image pinned by tag only (list $ .Values.image $startIndex): CKV_K8S_43
(digest) and CKV_K8S_15 (pull policy Always) pass by themselves once a digest is set.
*/}}
{{- define "visionflow.checkovImageSkips" -}}
{{- $img := index . 1 }}
{{- $n := index . 2 }}
{{- if not $img.digest -}}
checkov.io/skip{{ $n }}: CKV_K8S_43=Images are pinned to immutable version tags; set the image's digest value to pin by digest
checkov.io/skip{{ add $n 1 }}: CKV_K8S_15=IfNotPresent with a pinned version tag; pulling on every start only adds registry load and a registry outage as a failure mode
{{- end }}
{{- end }}

{{/* The S3 endpoint everything uses: the chart's MinIO, or storage.endpoint. */}}
{{- define "visionflow.s3Endpoint" -}}
{{- if .Values.minio.enabled }}
{{- printf "http://%s.%s:%v" (include "visionflow.componentName" (list . "minio")) .Release.Namespace .Values.minio.service.port }}
{{- else }}
{{- .Values.storage.endpoint }}
{{- end }}
{{- end }}

{{/* The MLflow tracking URI: the chart's server, or mlflow.trackingUri (may be empty). */}}
{{- define "visionflow.trackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s.%s:%v" (include "visionflow.componentName" (list . "mlflow")) .Release.Namespace .Values.mlflow.service.port }}
{{- else }}
{{- .Values.mlflow.trackingUri }}
{{- end }}
{{- end }}

{{/* The Secret with the S3 credentials; required once the chart runs MinIO or MLflow. */}}
{{- define "visionflow.s3Secret" -}}
{{- if or .Values.minio.enabled .Values.mlflow.enabled }}
{{- required "minio.existingSecret is required when minio or mlflow is enabled: create a Secret with the S3 access and secret keys (see values.yaml) and name it here" .Values.minio.existingSecret }}
{{- else }}
{{- .Values.minio.existingSecret }}
{{- end }}
{{- end }}

{{/* Environment variables with the S3 credentials, from the existing Secret. */}}
{{- define "visionflow.s3CredentialsEnv" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "visionflow.s3Secret" . }}
      key: {{ .Values.minio.accessKeyKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "visionflow.s3Secret" . }}
      key: {{ .Values.minio.secretKeyKey }}
{{- end }}

{{/* The port of a URL: the one it names, else its scheme's (443 for https, 80 otherwise). */}}
{{- define "visionflow.urlPort" -}}
{{- $url := urlParse . }}
{{- $host := $url.host }}
{{- if regexMatch ":[0-9]+$" $host }}
{{- regexFind "[0-9]+$" $host }}
{{- else if eq $url.scheme "https" }}443
{{- else }}80
{{- end }}
{{- end }}

{{/*
A value as a Hydra override writes it: maps as {k:v,...} (keys sorted), lists as [a,b], null as
null, whole numbers without an exponent (Helm reads numbers as floats: 4e+07 is 40000000),
anything else as its text. `serve.split={champion:0.9,challenger:0.1}` and the like.
*/}}
{{- define "visionflow.hydraValue" -}}
{{- if kindIs "map" . }}
{{- $items := list }}
{{- range $k := keys . | sortAlpha }}
{{- $items = append $items (printf "%s:%s" $k (include "visionflow.hydraValue" (index $ $k))) }}
{{- end }}
{{- printf "{%s}" (join "," $items) }}
{{- else if kindIs "slice" . }}
{{- $items := list }}
{{- range . }}
{{- $items = append $items (include "visionflow.hydraValue" .) }}
{{- end }}
{{- printf "[%s]" (join "," $items) }}
{{- else if kindIs "invalid" . }}null
{{- else if and (kindIs "float64" .) (eq (floor .) .) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
The `serve.*` overrides of the serving pods: serving.serve, and serve.threads from the CPU limit
unless set there (ONNX Runtime would otherwise start a thread per core of the node, up to 8,
whatever the pod's limit), as `serve.<key>=<value>` in key order.
*/}}
{{- define "visionflow.servingSettings" -}}
{{- $cpu := toString .Values.serving.resources.limits.cpu }}
{{- $cores := 0.0 }}
{{- if hasSuffix "m" $cpu }}
{{- $cores = divf (float64 (trimSuffix "m" $cpu)) 1000 }}
{{- else }}
{{- $cores = float64 $cpu }}
{{- end }}
{{- $serve := merge (deepCopy .Values.serving.serve) (dict "threads" (max 1 (int (floor $cores)))) }}
{{- range $key := keys $serve | sortAlpha }}
- {{ printf "serve.%s=%s" $key (include "visionflow.hydraValue" (index $serve $key)) | quote }}
{{- end }}
{{- end }}
