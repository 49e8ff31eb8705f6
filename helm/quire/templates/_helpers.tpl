{{/* Names and labels. */}}
{{- define "quire.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "quire.fullname" -}}
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

{{/* The workers' Deployment (and ScaledObject, PodMonitor, PDB): at most 63 characters. */}}
{{- define "quire.workerName" -}}
{{ include "quire.fullname" . | trunc 56 | trimSuffix "-" }}-worker
{{- end }}

{{/*
The CronJob's name: at most 52 characters, since its Jobs get an 11-character
suffix and a Job's name must fit a 63-character label.
*/}}
{{- define "quire.cronJobName" -}}
{{ include "quire.fullname" . | trunc 44 | trimSuffix "-" }}-nightly
{{- end }}

{{/* A name for a Job made by hand from the CronJob (the shell fills in the time). */}}
{{- define "quire.manualJobName" -}}
{{ include "quire.fullname" . | trunc 40 | trimSuffix "-" }}-manual-$(date +%s)
{{- end }}

{{- define "quire.labels" -}}
{{- include "quire.commonLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "quire.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "quire.selectorLabels" -}}
app.kubernetes.io/name: {{ include "quire.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "quire.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "quire.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The bundled NATS chart's full name, as that chart computes it. */}}
{{- define "quire.natsFullname" -}}
{{- if .Values.nats.fullnameOverride }}
{{- .Values.nats.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default "nats" .Values.nats.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The queue's URL: the bundled NATS's Service (nats.enabled, the default) or
queue.url. Both at once is refused: the bundled NATS would run unused.
*/}}
{{/* "true" when quire uses the bundled NATS chart (nats.enabled, no queue.url). */}}
{{- define "quire.bundledNats" -}}
{{- if and .Values.nats.enabled (not .Values.queue.url) }}true{{ end }}
{{- end }}

{{/* The Secret with the bundled NATS's user and password (templates/nats-auth-secret.yaml). */}}
{{- define "quire.bundledNatsSecret" -}}
{{ include "quire.natsFullname" . }}-auth
{{- end }}

{{/*
JetStream replicas for quire's streams: queue.streamReplicas, or for 0 with
the bundled NATS 1 (its cluster's size up to 3 with nats.config.cluster),
with an external NATS nothing (existing streams keep theirs, new ones get 1).
More than the bundled cluster has is refused.
*/}}
{{- define "quire.streamReplicas" -}}
{{- $want := int .Values.queue.streamReplicas }}
{{- $servers := 1 }}
{{- if and (include "quire.bundledNats" .) .Values.nats.config.cluster.enabled }}
{{- $servers = int .Values.nats.config.cluster.replicas }}
{{- end }}
{{- if and (eq $want 0) (include "quire.bundledNats" .) }}
{{- min $servers 3 }}
{{- else if eq $want 0 }}
{{- else if and (include "quire.bundledNats" .) (gt $want $servers) }}
{{- fail (printf "queue.streamReplicas (%d) is more than the bundled NATS has servers (%d): raise nats.config.cluster.replicas (with nats.config.cluster.enabled) or lower queue.streamReplicas" $want $servers) }}
{{- else }}
{{- $want }}
{{- end }}
{{- end }}

{{- define "quire.natsUrl" -}}
{{- if and .Values.queue.url .Values.nats.enabled }}
{{- fail "queue.url names an external NATS, and the bundled NATS is on (nats.enabled, the default): add --set nats.enabled=false, or leave queue.url empty to use the bundled NATS" }}
{{- else if .Values.queue.url }}
{{- .Values.queue.url }}
{{- else if .Values.nats.enabled }}
{{- printf "nats://%s.%s.svc:4222" (include "quire.natsFullname" .) .Release.Namespace }}
{{- else }}
{{- fail "queue.url is required with nats.enabled=false, e.g. --set queue.url=nats://nats.messaging.svc:4222 (or leave nats.enabled on for the bundled NATS)" }}
{{- end }}
{{- end }}

{{/*
Whether a run is configured: job.inputs and job.out both set ("true"), or
neither (""; nothing is scheduled and NOTES says what to set). One without
the other is refused.
*/}}
{{- define "quire.runConfigured" -}}
{{- $j := .Values.job }}
{{- if and $j.inputs $j.out }}true
{{- else if $j.inputs }}
{{- fail "job.out is required with job.inputs: where results go, e.g. --set job.out=s3://results/ocr" }}
{{- else if $j.out }}
{{- fail "job.inputs needs at least one input with job.out, e.g. --set 'job.inputs[0]=s3://scans/incoming/'" }}
{{- end }}
{{- end }}

{{/*
An image reference from (dict "root" $ "image" .Values.image "tag" DEFAULT_TAG):
global.imageRegistry (or image.registry) before the repository, then
@digest when image.digest is set (the tag is then left out), else :tag.
*/}}
{{- define "quire.imageRef" -}}
{{- $img := .image }}
{{- $registry := default $img.registry (dig "imageRegistry" "" (.root.Values.global | default dict)) }}
{{- $repo := $img.repository }}
{{- if $registry }}{{ $repo = printf "%s/%s" (trimSuffix "/" $registry) $repo }}{{ end }}
{{- if $img.digest }}
{{- printf "%s@%s" $repo $img.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .tag $img.tag) }}
{{- end }}
{{- end }}

{{- define "quire.image" -}}
{{- if gt (int .Values.worker.gpu) 0 -}}
{{ include "quire.imageRef" (dict "root" . "image" .Values.cudaImage "tag" (printf "%s-cuda" .Chart.AppVersion)) }}
{{- else -}}
{{ include "quire.cpuImage" . }}
{{- end }}
{{- end }}

{{- define "quire.cpuImage" -}}
{{ include "quire.imageRef" (dict "root" . "image" .Values.image "tag" .Chart.AppVersion) }}
{{- end }}

{{/*
Pod annotations that change when a Secret the chart makes changes, so that
`helm upgrade` with new credentials rolls the Pods.
*/}}
{{- define "quire.checksumAnnotations" -}}
checksum/secrets: {{ cat (include (print .Template.BasePath "/secrets.yaml") .) (include (print .Template.BasePath "/nats-auth-secret.yaml") .) | sha256sum }}
{{- end }}

{{/* Labels for every object and Pod: the chart's own and commonLabels. */}}
{{- define "quire.commonLabels" -}}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Secret names: the user's, or the one this chart makes from values. */}}
{{- define "quire.natsSecret" -}}
{{- if .Values.queue.auth.existingSecret }}{{ .Values.queue.auth.existingSecret }}
{{- else }}{{ include "quire.fullname" . }}-nats
{{- end }}
{{- end }}

{{- define "quire.s3Secret" -}}
{{- if .Values.s3.existingSecret }}{{ .Values.s3.existingSecret }}
{{- else if or .Values.s3.accessKeyId .Values.s3.secretAccessKey }}{{ include "quire.fullname" . }}-s3
{{- end }}
{{- end }}

{{- define "quire.hfSecret" -}}
{{- if .Values.huggingface.existingSecret }}{{ .Values.huggingface.existingSecret }}
{{- else if .Values.huggingface.token }}{{ include "quire.fullname" . }}-hf
{{- end }}
{{- end }}

{{/* securityContexts of every quire Pod and container (podSecurityContext, containerSecurityContext). */}}
{{- define "quire.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "quire.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{/*
Environment shared by every quire container: the QUIRE_* variables the
README documents. Secret values come only through secretKeyRef or mounted files.
*/}}
{{- define "quire.env" -}}
- name: QUIRE_NATS
  value: {{ include "quire.natsUrl" . | quote }}
{{- with include "quire.streamReplicas" . }}
- name: QUIRE_NATS_REPLICAS
  value: {{ . | quote }}
{{- end }}
{{- $a := .Values.queue.auth }}
{{- if include "quire.bundledNats" . }}
{{- if ne $a.method "none" }}
{{- fail (printf "queue.auth is for an external NATS (queue.url): the bundled NATS uses the user and password the chart generates into the Secret %s; leave queue.auth.method at none" (include "quire.bundledNatsSecret" .)) }}
{{- end }}
- name: QUIRE_NATS_USER
  valueFrom: {secretKeyRef: {name: {{ include "quire.bundledNatsSecret" . }}, key: user}}
- name: QUIRE_NATS_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ include "quire.bundledNatsSecret" . }}, key: password}}
{{- else if eq $a.method "userPassword" }}
- name: QUIRE_NATS_USER
  valueFrom: {secretKeyRef: {name: {{ include "quire.natsSecret" . }}, key: {{ $a.userKey }}}}
- name: QUIRE_NATS_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ include "quire.natsSecret" . }}, key: {{ $a.passwordKey }}}}
{{- else if eq $a.method "token" }}
- name: QUIRE_NATS_TOKEN
  valueFrom: {secretKeyRef: {name: {{ include "quire.natsSecret" . }}, key: {{ $a.tokenKey }}}}
{{- end }}
{{- if include "quire.natsCredsMounted" . }}
- name: QUIRE_NATS_CREDS
  value: /var/run/secrets/quire/nats/{{ .Values.queue.auth.credsKey }}
{{- end }}
{{- if .Values.queue.tls.enabled }}
{{- if .Values.queue.tls.requireTls }}
- name: QUIRE_NATS_REQUIRE_TLS
  value: "true"
{{- end }}
- name: QUIRE_NATS_TLS_CA
  value: /var/run/secrets/quire/nats-tls/{{ .Values.queue.tls.caKey }}
{{- if .Values.queue.tls.clientCert }}
- name: QUIRE_NATS_TLS_CERT
  value: /var/run/secrets/quire/nats-tls/tls.crt
- name: QUIRE_NATS_TLS_KEY
  value: /var/run/secrets/quire/nats-tls/tls.key
{{- end }}
{{- end }}
{{- with .Values.s3.endpoint }}
- name: QUIRE_S3_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: QUIRE_S3_REGION
  value: {{ . | quote }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- if .Values.s3.pathStyle }}
- name: QUIRE_S3_PATH_STYLE
  value: "true"
{{- end }}
{{- with include "quire.s3Secret" . }}
- name: AWS_ACCESS_KEY_ID
  valueFrom: {secretKeyRef: {name: {{ . }}, key: {{ $.Values.s3.accessKeyIdKey }}}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ . }}, key: {{ $.Values.s3.secretAccessKeyKey }}}}
{{- end }}
{{- with include "quire.hfSecret" . }}
- name: HF_TOKEN
  valueFrom: {secretKeyRef: {name: {{ . }}, key: {{ $.Values.huggingface.tokenKey }}}}
{{- end }}
- name: HF_HOME
  value: /cache/huggingface
{{- end }}

{{/* Whether a NATS credentials file is mounted. */}}
{{- define "quire.natsCredsMounted" -}}
{{- if eq .Values.queue.auth.method "creds" }}true{{- end }}
{{- end }}

{{- define "quire.secretVolumeMounts" -}}
{{- if include "quire.natsCredsMounted" . }}
- name: nats-creds
  mountPath: /var/run/secrets/quire/nats
  readOnly: true
{{- end }}
{{- if .Values.queue.tls.enabled }}
- name: nats-tls
  mountPath: /var/run/secrets/quire/nats-tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "quire.secretVolumes" -}}
{{- if include "quire.natsCredsMounted" . }}
- name: nats-creds
  secret:
    secretName: {{ include "quire.natsSecret" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.queue.auth.credsKey }}
        path: {{ .Values.queue.auth.credsKey }}
{{- end }}
{{- if .Values.queue.tls.enabled }}
- name: nats-tls
  secret:
    secretName: {{ required "queue.tls.secretName is required with queue.tls.enabled" .Values.queue.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}
