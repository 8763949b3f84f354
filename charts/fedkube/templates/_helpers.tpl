{{/* The chart name, overridable. */}}
{{- define "fedkube.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The name of the operator's objects: <release>-fedkube unless the release name already says fedkube. */}}
{{- define "fedkube.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fedkube.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that never change for the life of a release: used by selectors. */}}
{{- define "fedkube.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedkube.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The standard labels on every object of the chart. */}}
{{- define "fedkube.labels" -}}
helm.sh/chart: {{ include "fedkube.chart" . }}
{{ include "fedkube.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedkube
{{- end -}}

{{- define "fedkube.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fedkube.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fedkube.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The namespaces a namespace-scoped operator reconciles, comma-separated (default: the release namespace);
empty in cluster scope. The Roles and FEDKUBE_WATCH_NAMESPACES both come from here, so they cannot disagree. */}}
{{- define "fedkube.watchNamespaces" -}}
{{- if ne .Values.scope "cluster" -}}
{{- join "," (default (list .Release.Namespace) .Values.watchNamespaces | uniq) -}}
{{- end -}}
{{- end -}}

{{- /*
kopf peering (fedkube.operator.main: FEDKUBE_PEERING): on with peering.enabled or more than one replica, so two
replicas never both reconcile. "true" or "".
*/}}
{{- define "fedkube.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicas) 1) -}}true{{- end -}}
{{- end -}}
