{{/* The daemon reads and writes its ConfigMaps here, whatever the release namespace. */}}
{{- define "polarstack-daemon.dataNamespace" -}}kube-system{{- end }}

{{- define "polarstack-daemon.labels" -}}
app: polarstack-daemon
app.kubernetes.io/name: polarstack-daemon
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "polarstack-daemon.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end }}
