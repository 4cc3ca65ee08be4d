{{/*
Names are truncated to 63 characters: Kubernetes DNS labels (and so Service names) allow no more.
*/}}
{{- define "packet-inspector.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "packet-inspector.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "packet-inspector.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "packet-inspector.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: aggregator
{{- end }}

{{- define "packet-inspector.selectorLabels" -}}
app.kubernetes.io/name: {{ include "packet-inspector.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "packet-inspector.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "packet-inspector.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "packet-inspector.certificateSecret" -}}
{{- default (printf "istio.%s" (include "packet-inspector.serviceAccountName" .)) .Values.certificates.secretName }}
{{- end }}
