{{/* The chart's name ("mbcas"). */}}
{{- define "mbcas.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The daemon's objects are named after the release; release "mbcas" gives
the names of deploy/ ("mbcas", "mbcas-node-daemon"). */}}
{{- define "mbcas.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The labels of deploy/, then Helm's. */}}
{{- define "mbcas.labels" -}}
app.kubernetes.io/name: {{ include "mbcas.name" . }}
app.kubernetes.io/part-of: mbcas
{{ include "mbcas.helmLabels" . }}
{{- end -}}

{{- define "mbcas.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* Selector labels: the same as deploy/'s, so switching between kustomize
and Helm keeps the DaemonSet's (immutable) selector. */}}
{{- define "mbcas.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mbcas.name" . }}
{{- end -}}

{{- define "mbcas.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* Where the daemon's and the uninstall Job's pods run, and their network. */}}
{{- define "mbcas.placement" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .Values.hostNetwork }}
hostNetwork: true
{{- end }}
{{- with .Values.dnsPolicy }}
dnsPolicy: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* KUBERNETES_SERVICE_HOST/PORT when the API server is reached directly. */}}
{{- define "mbcas.apiServerEnv" -}}
{{- with .Values.apiServer.host }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ . | quote }}
{{- end }}
{{- with .Values.apiServer.port }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ . | quote }}
{{- end }}
{{- end -}}
