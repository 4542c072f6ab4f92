{{/* Names, labels and the pieces every kvweave pod shares. */}}

{{- define "kvweave.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's name prefix of every object: <release>, or <release>-kvweave when the release name lacks "kvweave". */}}
{{- define "kvweave.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kvweave.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The labels that select one component's pods: include with (dict "root" $ "component" "router"). */}}
{{- define "kvweave.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvweave.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kvweave.labels" -}}
{{ include "kvweave.selectorLabels" . }}
helm.sh/chart: {{ include "kvweave.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: kvweave
{{- end -}}

{{- define "kvweave.tag" -}}
{{- .Values.image.tag | default .Chart.AppVersion -}}
{{- end -}}

{{/* The worker image (CUDA base) and the slim one of the router and the planner. */}}
{{- define "kvweave.workerImage" -}}
{{- printf "%s:%s" .Values.image.repository (include "kvweave.tag" .) -}}
{{- end -}}

{{- define "kvweave.slimImage" -}}
{{- printf "%s:%s-slim" .Values.image.repository (include "kvweave.tag" .) -}}
{{- end -}}

{{/* Ports: one number per purpose, the same in every pod of a kind. */}}
{{- define "kvweave.routerGrpcPort" -}}50051{{- end -}}
{{- define "kvweave.routerHttpPort" -}}8000{{- end -}}
{{- define "kvweave.workerGrpcPort" -}}50061{{- end -}}
{{- define "kvweave.workerMetricsPort" -}}9400{{- end -}}

{{- define "kvweave.redisName" -}}
{{- printf "%s-redis" (include "kvweave.fullname" .) -}}
{{- end -}}

{{/* The Redis URL every process dials (its password comes from a file, never the URL). */}}
{{- define "kvweave.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s:6379/0" (include "kvweave.redisName" .) -}}
{{- else -}}
{{- .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding `redis-password`, or "" (an external Redis without one). */}}
{{- define "kvweave.redisSecret" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecret -}}
{{- else if .Values.redis.enabled -}}
{{- printf "%s-redis" (include "kvweave.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "kvweave.clusterSecret" -}}
{{- .Values.clusterSecret.existingSecret | default (printf "%s-cluster-secret" (include "kvweave.fullname" .)) -}}
{{- end -}}

{{/*
A random value generated once: the existing Secret's value on upgrades (so the cluster secret and
the Redis password survive `helm upgrade`), a fresh one at install.
Include with (dict "root" $ "name" SECRET_NAME "key" KEY "length" N).
*/}}
{{- define "kvweave.randomSecretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- if and $existing (index $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- randAlphaNum (int .length) | b64enc -}}
{{- end -}}
{{- end -}}

{{/* Flags of every cluster process: Redis, its password and the cluster secret, as files. */}}
{{- define "kvweave.clusterArgs" -}}
- --redis-url={{ include "kvweave.redisUrl" . }}
{{- if include "kvweave.redisSecret" . }}
- --redis-password-file=/etc/kvweave/redis/redis-password
{{- end }}
- --cluster-secret-file=/etc/kvweave/cluster/cluster-secret
{{- end -}}

{{- define "kvweave.clusterVolumeMounts" -}}
- name: cluster-secret
  mountPath: /etc/kvweave/cluster
  readOnly: true
{{- if include "kvweave.redisSecret" . }}
- name: redis-password
  mountPath: /etc/kvweave/redis
  readOnly: true
{{- end }}
{{- end -}}

{{- define "kvweave.clusterVolumes" -}}
- name: cluster-secret
  secret:
    secretName: {{ include "kvweave.clusterSecret" . }}
    defaultMode: 0400
    items:
      - key: cluster-secret
        path: cluster-secret
{{- if include "kvweave.redisSecret" . }}
- name: redis-password
  secret:
    secretName: {{ include "kvweave.redisSecret" . }}
    defaultMode: 0400
    items:
      - key: redis-password
        path: redis-password
{{- end }}
{{- end -}}

{{/* The model's volume (a PVC or a node folder), mounted read-only; nothing when the image holds the model. */}}
{{- define "kvweave.modelVolumeMounts" -}}
{{- if or .Values.model.volume.claimName .Values.model.volume.hostPath -}}
- name: model
  mountPath: {{ .Values.model.volume.mountPath }}
  readOnly: true
{{- end -}}
{{- end -}}

{{- define "kvweave.modelVolumes" -}}
{{- with .Values.model.volume -}}
{{- if .claimName -}}
- name: model
  persistentVolumeClaim:
    claimName: {{ .claimName }}
    readOnly: true
{{- else if .hostPath -}}
- name: model
  hostPath:
    path: {{ .hostPath }}
    type: Directory
{{- end -}}
{{- end -}}
{{- end -}}

{{/* What `--model` gets: the checkpoint path, else the built-in name. */}}
{{- define "kvweave.modelArg" -}}
{{- .Values.model.path | default .Values.model.name -}}
{{- end -}}

{{/* Checks across values that a JSON schema cannot express; each failure says what to change. */}}
{{- define "kvweave.validate" -}}
{{- if and .Values.redis.enabled .Values.redis.externalUrl -}}
{{- fail "redis.externalUrl is set while redis.enabled is true: set redis.enabled=false to use an external Redis, or leave redis.externalUrl empty" -}}
{{- end -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.externalUrl) -}}
{{- fail "redis.enabled is false but redis.externalUrl is empty: give the external Redis URL (redis://HOST:6379/0)" -}}
{{- end -}}
{{- if and .Values.model.volume.claimName .Values.model.volume.hostPath -}}
{{- fail "model.volume: set claimName or hostPath, not both" -}}
{{- end -}}
{{- if and (or .Values.model.volume.claimName .Values.model.volume.hostPath) (not .Values.model.path) -}}
{{- fail "model.volume is set but model.path is empty: give the checkpoint's path inside model.volume.mountPath (a Hugging Face folder or a .gguf file)" -}}
{{- end -}}
{{- $serving := or .Values.workers.colocated.enabled .Values.workers.decode.enabled -}}
{{- if not $serving -}}
{{- fail "no worker pool can serve a whole request: enable workers.colocated or workers.decode (prefill and encode workers only help them)" -}}
{{- end -}}
{{- if and .Values.planner.enabled (gt (int .Values.planner.minReplicas) (int .Values.planner.maxReplicas)) -}}
{{- fail (printf "planner.minReplicas (%v) is above planner.maxReplicas (%v)" .Values.planner.minReplicas .Values.planner.maxReplicas) -}}
{{- end -}}
{{- if .Values.planner.enabled -}}
{{- range $role, $bounds := (.Values.planner.pools | default dict) -}}
{{- $min := ternary $bounds.minReplicas $.Values.planner.minReplicas (hasKey $bounds "minReplicas") -}}
{{- $max := ternary $bounds.maxReplicas $.Values.planner.maxReplicas (hasKey $bounds "maxReplicas") -}}
{{- if gt (int $min) (int $max) -}}
{{- fail (printf "planner.pools.%s: its minReplicas (%v) is above its maxReplicas (%v)" $role $min $max) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The model's id (what /v1/models lists): the built-in name, or the checkpoint's folder or file name without .gguf. */}}
{{- define "kvweave.modelId" -}}
{{- if .Values.model.path -}}
{{- base (trimSuffix "/" .Values.model.path) | trimSuffix ".gguf" -}}
{{- else -}}
{{- .Values.model.name -}}
{{- end -}}
{{- end -}}
