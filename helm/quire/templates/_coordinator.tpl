{{/*
The coordinator's pod template, for the nightly CronJob (and the Jobs made
from it by hand): `quire coordinator ... --wait`, so the pod's exit code is
the run's.
*/}}
{{- define "quire.coordinatorPod" -}}
{{- $ := . }}
{{- $c := $.Values.coordinator }}
{{- $j := $.Values.job }}
{{- range $k, $v := dict "job.name" $j.name "job.run" $j.run }}
{{- if contains "{time}" $v }}
{{- fail (printf "%s (%s) must not hold {time}: a retried coordinator Pod would expand it anew and start another run; {date} keeps one run per day" $k $v) }}
{{- end }}
{{- end }}
metadata:
  labels:
    {{- include "quire.commonLabels" $ | nindent 4 }}
    {{- include "quire.selectorLabels" (dict "root" $ "component" "coordinator") | nindent 4 }}
  annotations:
    {{- include "quire.checksumAnnotations" $ | nindent 4 }}
    {{- with $c.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  restartPolicy: Never
  serviceAccountName: {{ include "quire.serviceAccountName" $ }}
  automountServiceAccountToken: false
  {{- with $.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "quire.podSecurityContext" $ | nindent 4 }}
  {{- with $c.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: coordinator
      image: {{ include "quire.cpuImage" $ }}
      imagePullPolicy: {{ $.Values.image.pullPolicy }}
      args:
        - coordinator
        {{- range $j.inputs }}
        - --input
        - {{ . | quote }}
        {{- end }}
        - --out
        - {{ $j.out | quote }}
        - --job
        - {{ $j.name | quote }}
        - --run
        - {{ required "job.run is required (e.g. \"{date}\": one run per UTC day; quire's own default holds {time})" $j.run | quote }}
        - --task
        - {{ $j.task | quote }}
        - --engine
        - {{ $j.engine | quote }}
        {{- with $j.model }}
        - --model
        - {{ . | quote }}
        {{- end }}
        - --pages-per-task
        - {{ $j.pagesPerTask | quote }}
        - --max-deliver
        - {{ $j.maxDeliver | quote }}
        - --ack-wait-s
        - {{ $j.ackWaitSeconds | quote }}
        - --poll-ms
        - {{ $c.pollMs | quote }}
        - --metrics-addr
        - "0.0.0.0:{{ $c.metricsPort }}"
        {{- range $j.extraArgs }}
        - {{ . | quote }}
        {{- end }}
        - --wait
      ports:
        - name: metrics
          containerPort: {{ $c.metricsPort }}
          protocol: TCP
      env:
        {{- include "quire.env" $ | nindent 8 }}
        {{- with $.Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $c.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- toYaml $c.resources | nindent 8 }}
      securityContext:
        {{- include "quire.containerSecurityContext" $ | nindent 8 }}
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        - {name: cache, mountPath: /cache}
        {{- include "quire.secretVolumeMounts" $ | nindent 8 }}
        {{- with $.Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {sizeLimit: 4Gi}
    - name: cache
      emptyDir: {sizeLimit: 1Gi}
    {{- include "quire.secretVolumes" $ | nindent 4 }}
    {{- with $.Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
When a coordinator Pod's failure ends the Job. Exit 2 (usage or setup: a
retry fails the same way) and 3 (the run finished, but pages failed or tasks
were given up: a retry changes nothing) end it at once; a Pod lost to node
disruption (drain, preemption, eviction) does not count against backoffLimit;
any other failure (1: internal error, OOM kill) is retried up to backoffLimit.
*/}}
{{- define "quire.coordinatorFailurePolicy" -}}
podFailurePolicy:
  rules:
    - action: FailJob
      onExitCodes:
        containerName: coordinator
        operator: In
        values: [2, 3]
      # Empty, as Kubernetes 1.27's API schema lists the field as required.
      onPodConditions: []
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
{{- end }}
