{{/* Labels every object of the chart carries. */}}
{{- define "driftlab.labels" -}}
app.kubernetes.io/name: driftlab
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The Secret holding the S3 credentials: the user's, or the one this chart creates. */}}
{{- define "driftlab.s3Secret" -}}
{{- default .Values.s3.secretName .Values.s3.existingSecret -}}
{{- end -}}
