#!/usr/bin/env bash
# A local Kubernetes cluster for end-to-end runs: kind + Kubeflow Pipelines (standalone) + the
# Kubeflow Training Operator + visionflow's chart. Needs docker, kind, kubectl, helm and network.
# It cannot run in visionflow's CI (no Docker there); every piece it relies on is tested there.
set -euo pipefail

CLUSTER=${CLUSTER:-visionflow}
KFP_VERSION=${KFP_VERSION:-2.5.0}                 # KFP standalone manifests
TRAINING_OPERATOR_VERSION=${TRAINING_OPERATOR_VERSION:-v1.9.2}
NAMESPACE=${NAMESPACE:-kubeflow}
: "${CPU_IMAGE:?set CPU_IMAGE (make kind-up does)}" "${TRAIN_IMAGE:?set TRAIN_IMAGE}"

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "kind-up: $tool is not installed" >&2; exit 1; }
done

kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
kubectl config use-context "kind-$CLUSTER"

echo "== Kubeflow Pipelines $KFP_VERSION"
kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=$KFP_VERSION"
kubectl wait --for condition=established --timeout=120s crd/applications.app.k8s.io
kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=$KFP_VERSION"

echo "== Training Operator $TRAINING_OPERATOR_VERSION"
kubectl apply --server-side -k "github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=$TRAINING_OPERATOR_VERSION"

echo "== images"
kind load docker-image --name "$CLUSTER" "$CPU_IMAGE" "$TRAIN_IMAGE"

echo "== waiting for KFP"
kubectl -n "$NAMESPACE" wait --for=condition=available --timeout=900s deployment --all

echo "== visionflow chart"
# The MinIO that KFP installs holds our bucket too; its default credentials are KFP's own
# (minio / minio123), stored in the Secret our pods read. Use real ones anywhere else.
kubectl -n "$NAMESPACE" get secret visionflow-minio >/dev/null 2>&1 || kubectl -n "$NAMESPACE" create secret generic visionflow-minio \
  --from-literal=AWS_ACCESS_KEY_ID="$(kubectl -n "$NAMESPACE" get secret mlpipeline-minio-artifact -o jsonpath='{.data.accesskey}' | base64 -d)" \
  --from-literal=AWS_SECRET_ACCESS_KEY="$(kubectl -n "$NAMESPACE" get secret mlpipeline-minio-artifact -o jsonpath='{.data.secretkey}' | base64 -d)"
# MLflow's database: sqlite inside its pod is enough for a throwaway cluster (lost on restart).
kubectl -n "$NAMESPACE" get secret visionflow-mlflow-db >/dev/null 2>&1 || kubectl -n "$NAMESPACE" create secret generic visionflow-mlflow-db \
  --from-literal=MLFLOW_BACKEND_STORE_URI=sqlite:////tmp/mlflow.db
# Our bucket in KFP's MinIO (a directory of its filesystem backend).
kubectl -n "$NAMESPACE" exec deploy/minio -- mkdir -p /data/visionflow
helm upgrade --install visionflow charts/visionflow -n "$NAMESPACE" -f charts/visionflow/ci/kind-values.yaml --wait --timeout 15m

cat <<MSG
Ready. In another shell:
  kubectl -n $NAMESPACE port-forward svc/ml-pipeline-ui 8080:80
then:
  make e2e                                    # or
  make pipeline-run KFP_HOST=http://localhost:8080 ARGS='experiment=shapes_tiny'
MSG
