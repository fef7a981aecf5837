{{/* Names, labels and the settings every template shares. */}}

{{- define "sglang-ha.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sglang-ha.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: include "sglang-ha.selector" (list . "node") */}}
{{- define "sglang-ha.selector" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ $ctx.Chart.Name }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "sglang-ha.image" -}}
{{- $ctx := index . 0 -}}{{- $img := index . 1 -}}
{{- printf "%s%s:%s" $ctx.Values.image.registry $img.repository $img.tag -}}
{{- end -}}

{{- define "sglang-ha.secretName" -}}
{{- default (printf "%s-secrets" (include "sglang-ha.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "sglang-ha.nodeSvc" -}}{{ include "sglang-ha.fullname" . }}-node{{- end -}}
{{- define "sglang-ha.redisSvc" -}}{{ include "sglang-ha.fullname" . }}-redis{{- end -}}
{{- define "sglang-ha.sentinelSvc" -}}{{ include "sglang-ha.fullname" . }}-sentinel{{- end -}}

{{/* The DNS name of node I (its StatefulSet pod, through the headless Service). */}}
{{- define "sglang-ha.nodeHost" -}}
{{- $ctx := index . 0 -}}
{{- printf "%s-node-%d.%s.%s.svc" (include "sglang-ha.fullname" $ctx) (index . 1) (include "sglang-ha.nodeSvc" $ctx) $ctx.Release.Namespace -}}
{{- end -}}

{{/* HA_SENTINELS: the chart's three Sentinels, or the external ones. */}}
{{- define "sglang-ha.sentinels" -}}
{{- if .Values.redis.enabled -}}
{{- $out := list -}}
{{- range $i := until 3 -}}
{{- $out = append $out (printf "%s-sentinel-%d.%s.%s.svc:26379" (include "sglang-ha.fullname" $) $i (include "sglang-ha.sentinelSvc" $) $.Release.Namespace) -}}
{{- end -}}
{{- join "," $out -}}
{{- else -}}
{{- required "externalRedis.sentinels must name the Sentinels when redis.enabled is false" (join "," .Values.externalRedis.sentinels) -}}
{{- end -}}
{{- end -}}

{{/* Settings of every sglang-ha process (compose/env/ha.env), as env entries. */}}
{{- define "sglang-ha.haEnv" -}}
- {name: HA_CLUSTER, value: {{ .Values.clusterName | quote }}}
- {name: HA_SENTINELS, value: {{ include "sglang-ha.sentinels" . | quote }}}
- {name: HA_SENTINEL_MASTER, value: {{ .Values.ha.sentinelMaster | quote }}}
- {name: HA_LOG_LEVEL, value: {{ .Values.ha.logLevel | quote }}}
- {name: HA_REDIS_USERNAME, value: {{ .Values.ha.redisUsername | quote }}}
- {name: HA_SECRETS_DIR, value: /run/secrets}
{{- end -}}

{{/*
Secret files of one component, as a projected volume: only the keys it needs.
include "sglang-ha.secretVolume" (list . (list "engine_api_key" ...))
*/}}
{{- define "sglang-ha.secretVolume" -}}
{{- $ctx := index . 0 -}}
- name: secrets
  projected:
    defaultMode: 0440
    sources:
      - secret:
          name: {{ include "sglang-ha.secretName" $ctx }}
          items:
          {{- range index . 1 }}
            - {key: {{ . }}, path: {{ . }}}
          {{- end }}
{{- end -}}

{{/* Seconds a node's pod needs to stop cleanly: the preStop (handover wait, as
LeaseTiming.handover_wait: max(4 x lease TTL, 10 s), then the drain) and
supervisord's stop of the engine (stopwaitsecs=30) and of the agent (10). */}}
{{- define "sglang-ha.nodeStopSeconds" -}}
{{- $handover := max 10 (ceil (mulf 4.0 (float64 .Values.ha.leaseTtl))) -}}
{{- add (int64 $handover) (int64 .Values.nodes.drainTimeout) 30 10 -}}
{{- end -}}

{{- define "sglang-ha.podSecurity" -}}
runAsNonRoot: true
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "sglang-ha.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
{{- end -}}

{{- define "sglang-ha.validate" -}}
{{- if not (has .Values.mode (list "pair" "pool")) -}}
{{- fail (printf "mode must be pair or pool, not %q" .Values.mode) -}}
{{- end -}}
{{- if eq .Values.mode "pair" -}}
{{- if ne (int .Values.nodes.replicas) 2 -}}
{{- fail "mode pair runs exactly 2 nodes (nodes.replicas: 2)" -}}
{{- end -}}
{{- else -}}
{{- if not .Values.pool.acknowledgeNotImplemented -}}
{{- fail "mode pool: the agents' pool mode is not implemented yet; N nodes still elect one primary. Set pool.acknowledgeNotImplemented=true to render it anyway." -}}
{{- end -}}
{{- if lt (int .Values.nodes.replicas) 2 -}}
{{- fail "mode pool needs nodes.replicas >= 2" -}}
{{- end -}}
{{- end -}}
{{- if not (has .Values.nodes.engine (list "sglang" "simulator")) -}}
{{- fail "nodes.engine must be sglang or simulator" -}}
{{- end -}}
{{- with .Values.nodes.terminationGracePeriodSeconds -}}
{{- if lt (int .) (int (include "sglang-ha.nodeStopSeconds" $)) -}}
{{- fail (printf "nodes.terminationGracePeriodSeconds=%d is shorter than the handover, drain and engine stop need (%s s)" (int .) (include "sglang-ha.nodeStopSeconds" $)) -}}
{{- end -}}
{{- end -}}
{{- if lt (int .Values.gateway.replicas) 2 -}}
{{- fail "gateway.replicas must be 2 or more: the Service replaces the compose pair's VIP" -}}
{{- end -}}
{{- end -}}
