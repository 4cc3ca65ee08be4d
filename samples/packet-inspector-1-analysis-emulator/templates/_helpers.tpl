{{/*
Names are truncated to 63 characters (DNS labels). The Service and ServiceAccount are named after
the chart (not the release) unless fullnameOverride says otherwise, so the DNS name the
aggregators dial by default, packet-inspector-1-analysis-emulator.<namespace>.svc.cluster.local,
is the one in the certificate's SAN whatever the release is called.
*/}}
{{- define "emulator.fullname" -}}
{{- default .Chart.Name .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "emulator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "emulator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "emulator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
