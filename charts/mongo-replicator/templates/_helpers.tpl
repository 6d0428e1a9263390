{{/* Name of the chart's objects, at most 63 characters. */}}
{{- define "mongo-replicator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, suffixed with the chart name unless it already holds it. */}}
{{- define "mongo-replicator.fullname" -}}
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

{{- define "mongo-replicator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "mongo-replicator.labels" -}}
helm.sh/chart: {{ include "mongo-replicator.chart" . }}
{{ include "mongo-replicator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | replace "+" "_" | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mongo-replicator
{{- end }}

{{/* Labels that select the operator's pods; fixed for the life of a release. */}}
{{- define "mongo-replicator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mongo-replicator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "mongo-replicator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mongo-replicator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator's image: repository@digest, or repository:tag (tag defaults to appVersion). */}}
{{- define "mongo-replicator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
What the operator touches in the namespaces it watches, verb by verb. The same rules go into the
ClusterRole (all namespaces) or into a Role in each watched namespace.
- mongoreplications: read, and patch/update for finalizers; status: the operator's conditions.
- mongoreplications/finalizers update: children carry owner references with
  blockOwnerDeletion, which clusters with the OwnerReferencesPermissionEnforcement admission
  plugin (OpenShift, hardened clusters) allow only to who may update the owner's finalizers.
- serviceaccounts, configmaps, jobs, deployments, roles, rolebindings: the per-replication children.
  The operator grants replicator pods a Role it holds itself (get mongoreplications, patch
  mongoreplications/status, by resourceNames), so it needs neither escalate nor bind.
- secrets: read only (referenced connection strings and CA bundles are hashed into pod templates).
- pods: read only (termination messages of validation Job pods).
- events: written in both APIs.
*/}}
{{- define "mongo-replicator.operatorRules" -}}
- apiGroups: [mongo-replicator.io]
  resources: [mongoreplications]
  verbs: [get, list, watch, patch, update]
- apiGroups: [mongo-replicator.io]
  resources: [mongoreplications/status]
  verbs: [get, patch, update]
- apiGroups: [mongo-replicator.io]
  resources: [mongoreplications/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [serviceaccounts, configmaps]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create, patch, update, delete]
{{- end }}
