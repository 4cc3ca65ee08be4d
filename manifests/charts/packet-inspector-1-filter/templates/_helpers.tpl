{{/*
Names are truncated to 63 characters: Kubernetes object names of these kinds allow no more.
*/}}
{{- define "filter.fullname" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "filter.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ .Chart.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: capture-filter
{{- end }}

{{/* The Envoy cluster names the patches add (one per instance, so instances can coexist). */}}
{{- define "filter.cluster" -}}
{{- printf "packet_inspector_%s" (.Release.Name | replace "-" "_") }}
{{- end }}
{{- define "filter.moduleCluster" -}}
{{- printf "packet_inspector_module_%s" (.Release.Name | replace "-" "_") }}
{{- end }}

{{- define "filter.nativeModuleCluster" -}}
{{- printf "packet_inspector_native_module_%s" (.Release.Name | replace "-" "_") }}
{{- end }}

{{- define "filter.moduleUrl" -}}
{{- default (printf "http://%s:%d/filter.wasm" .Values.aggregator.host (int .Values.aggregator.adminPort)) .Values.module.url }}
{{- end }}
{{- define "filter.nativeModuleUrl" -}}
{{- default (printf "http://%s:%d/native-capture.so" .Values.aggregator.host (int .Values.aggregator.adminPort)) .Values.nativeModule.url }}
{{- end }}

{{/* Whether HTTP is captured by the native capture, and whether any patch runs the Wasm module. */}}
{{- define "filter.httpNative" -}}
{{- if and .Values.httpCapture.enabled (eq .Values.httpCapture.module "native") }}true{{ end }}
{{- end }}
{{- define "filter.usesWasm" -}}
{{- if or (and .Values.httpCapture.enabled (eq .Values.httpCapture.module "wasm")) (and .Values.diameterCapture.enabled (not .Values.gateway.enabled)) }}true{{ end }}
{{- end }}

{{/*
A cluster fetching a module from a URL's host (plain HTTP, the module pinned by sha256):
(dict "name" NAME "url" URL).
*/}}
{{- define "filter.moduleClusterPatch" -}}
- applyTo: CLUSTER
  match:
    context: {{ .context }}
  patch:
    operation: ADD
    value:
      name: {{ .name }}
      type: STRICT_DNS
      connect_timeout: 2s
      dns_lookup_family: V4_PREFERRED
      load_assignment:
        cluster_name: {{ .name }}
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address:
                      address: {{ (urlParse .url).hostname }}
                      port_value: {{ (urlParse .url).host | splitList ":" | last | int | default 80 }}
{{- end }}

{{/*
The native capture's configuration (JSON) for one patch: the plugin configuration's capture
keys, with the aggregator dialled by the library itself and the sidecar's certificate from
Istio's node agent (SDS): (dict "root" $ "role" "auto").
*/}}
{{- define "filter.nativeConfig" -}}
{{- $root := .root -}}
{{- $values := $root.Values -}}
{{- /* The first identity to check for; none: any certificate of the mesh CA, as the Wasm filter's cluster. */ -}}
{{- $serverName := (first $values.aggregator.subjectAltNames) | default "" -}}
{{- $aggregator := dict "address" (printf "%s:%d" $values.aggregator.host (int $values.aggregator.port)) "serverName" $serverName "sdsSocket" $values.nativeModule.sdsSocket -}}
{{- /* Istio's injection mounts the pod's labels here (downward API). */ -}}
{{- $config := dict "aggregator" $aggregator "podLabelsFile" "/etc/istio/pod/labels" "flushIntervalMs" (int $values.flushIntervalMs) "role" .role "maxBodyBytes" (int $values.httpCapture.maxBodyBytes) "labels" $values.httpCapture.labels "gateway" $values.gateway.enabled -}}
{{- $config | toJson }}
{{- end }}

{{/*
The Wasm plugin config shared by every patch; "protocol" and "role" come from the caller:
(dict "root" $ "protocol" "http" "role" "auto").
*/}}
{{- define "filter.pluginConfig" -}}
{{- $root := .root -}}
{{- $config := dict "cluster" (include "filter.cluster" $root) "flushIntervalMs" (int $root.Values.flushIntervalMs) "protocol" .protocol "role" .role -}}
{{- if eq .protocol "http" }}
{{- $_ := set $config "maxBodyBytes" (int $root.Values.httpCapture.maxBodyBytes) -}}
{{- $_ := set $config "labels" $root.Values.httpCapture.labels -}}
{{- $_ := set $config "gateway" $root.Values.gateway.enabled -}}
{{- else }}
{{- $_ := set $config "diameterPort" (int $root.Values.diameterCapture.port) -}}
{{- end }}
name: {{ printf "packet_inspector_%s" .protocol }}
root_id: packet_inspector
failure_policy: {{ $root.Values.failurePolicy }}
configuration:
  "@type": type.googleapis.com/google.protobuf.StringValue
  value: {{ $config | toJson | quote }}
vm_config:
  vm_id: {{ printf "packet_inspector_%s" $root.Values.module.sha256 | trunc 40 }}
  runtime: envoy.wasm.runtime.v8
  code:
    remote:
      http_uri:
        uri: {{ include "filter.moduleUrl" $root }}
        cluster: {{ include "filter.moduleCluster" $root }}
        timeout: 10s
      sha256: {{ $root.Values.module.sha256 | quote }}
      retry_policy:
        num_retries: 5
{{- end }}

{{/* Istio's SDS secrets of the sidecar: its workload certificate and the mesh root. */}}
{{- define "filter.sds" -}}
sds_config:
  api_config_source:
    api_type: GRPC
    transport_api_version: V3
    grpc_services:
      - envoy_grpc:
          cluster_name: sds-grpc
  resource_api_version: V3
{{- end }}
