{{/* Names. KubeRay refuses RayCluster names longer than 53 characters. */}}
{{- define "splitserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 53 | trimSuffix "-" -}}
{{- end -}}

{{- define "splitserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 53 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 53 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 53 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "splitserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The head pod (router, controller), by the labels KubeRay puts on the pods it makes. */}}
{{- define "splitserve.headSelector" -}}
ray.io/cluster: {{ include "splitserve.fullname" . }}
ray.io/node-type: head
{{- end -}}

{{- define "splitserve.labels" -}}
{{ include "splitserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "splitserve.image" -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) .Values.image.tag -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "splitserve.configMapName" -}}
{{- printf "%s-config" (include "splitserve.fullname" .) -}}
{{- end -}}

{{- define "splitserve.apiKeysSecret" -}}
{{- if .Values.apiKeys.create -}}
{{- printf "%s-api-keys" (include "splitserve.fullname" .) -}}
{{- else -}}
{{- .Values.apiKeys.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* "true" when the router's /metrics wants an API key: keys are set and router.openMetrics is false. */}}
{{- define "splitserve.metricsNeedKey" -}}
{{- if and (include "splitserve.apiKeysSecret" .) (not .Values.router.openMetrics) -}}true{{- end -}}
{{- end -}}

{{/* The Secret whose metrics.podMonitor.bearerTokenSecret.key the PodMonitor sends: given, else the chart's own. */}}
{{- define "splitserve.metricsTokenSecret" -}}
{{- if .Values.metrics.podMonitor.bearerTokenSecret.name -}}
{{- .Values.metrics.podMonitor.bearerTokenSecret.name -}}
{{- else if .Values.apiKeys.create -}}
{{- include "splitserve.apiKeysSecret" . -}}
{{- end -}}
{{- end -}}

{{/* Where the head mounts the cluster config: `splitserve up --config` reads it. */}}
{{- define "splitserve.configDir" -}}/etc/splitserve{{- end -}}

{{/*
The splitserve cluster config (cluster/config.py, ClusterConfig) in the ConfigMap; the router's settings
(router/config.py, RouterConfig) in its router section. Each pool asks
Ray for its rayResource, which only that pool's worker group offers: the controller's placement
and the RayCluster's worker groups are written from the same values. The planner gets only the SLO
targets set (slo.ttftSeconds plans the prefill pool, slo.tpotSeconds the decode pool), never a value
for the other: a pool without its own target is not planned (cluster/config.py, PlannerSpec).
*/}}
{{- define "splitserve.clusterConfig" -}}
# splitserve cluster config (cluster/config.py); the head adds --address auto --host 0.0.0.0 --worker-host auto.
model: {{ toJson .Values.model.name }}
{{- with .Values.model.dtype }}
dtype: {{ toJson . }}
{{- end }}
device: {{ toJson .Values.model.device }}
transport: {{ toJson .Values.transport }}
lease_ms: {{ int .Values.router.leaseMs }}
router:
  port: {{ int .Values.router.httpPort }}
  grpc_port: {{ int .Values.router.grpcPort }}
  local_prefill_threshold: {{ int .Values.router.localPrefillThreshold }}
  open_metrics: {{ .Values.router.openMetrics }}
  open_docs: {{ .Values.router.openDocs }}
  shutdown_delay_s: {{ .Values.router.shutdownDelaySeconds }}
  keep_alive_s: {{ .Values.router.keepAliveSeconds }}
  {{- /* --set hands helm a fraction as a string; the schema admits only numbers and decimal strings where a number goes. */}}
  {{- range $name, $value := .Values.router.settings }}
  {{ $name }}: {{ if and (kindIs "string" $value) (regexMatch "^[0-9.]" $value) }}{{ float64 $value | toJson }}{{ else }}{{ toJson $value }}{{ end }}
  {{- end }}
{{- range $role := list "prefill" "decode" }}
{{- $pool := index $.Values $role }}
{{ $role }}:
  replicas: {{ int $pool.replicas }}
  min_replicas: {{ int $pool.minReplicas }}
  max_replicas: {{ int $pool.maxReplicas }}
  num_cpus: {{ int $pool.cpusPerWorker }}
  num_gpus: {{ int $pool.gpusPerWorker }}
  resources: {{ toJson (dict $pool.rayResource 1) }}
  threads: {{ int $pool.threads }}
  kv_cache_mb: {{ int $pool.kvCacheMb }}
  {{- range $key, $name := dict "maxNumSeqs" "max_num_seqs" "maxNumBatchedTokens" "max_num_batched_tokens" "prefillChunkBesideDecodes" "prefill_chunk_beside_decodes" }}
  {{- with index $pool $key }}
  {{ $name }}: {{ int . }}
  {{- end }}
  {{- end }}
{{- end }}
planner:
  enabled: {{ or (not (empty .Values.slo.ttftSeconds)) (not (empty .Values.slo.tpotSeconds)) }}
  {{- with .Values.slo.ttftSeconds }}
  ttft_target_s: {{ float64 . | toJson }}
  {{- end }}
  {{- with .Values.slo.tpotSeconds }}
  tpot_target_s: {{ float64 . | toJson }}
  {{- end }}
  interval_s: {{ float64 .Values.planner.intervalSeconds | toJson }}
  window_s: {{ float64 .Values.planner.windowSeconds | toJson }}
  scale_up_cooldown_s: {{ float64 .Values.planner.scaleUpCooldownSeconds | toJson }}
  scale_down_cooldown_s: {{ float64 .Values.planner.scaleDownCooldownSeconds | toJson }}
{{- end -}}

{{/*
The head container's shell line. KubeRay puts its generated `ray start` command in
$KUBERAY_GEN_RAY_START_CMD (the RayCluster's ray.io/overwrite-container-cmd annotation keeps our
command as written); `eval` honours its quoting. Dropping --block lets `ray start` return, then
`splitserve up` becomes the container's main process: when it exits, the container restarts.
*/}}
{{- define "splitserve.headScript" -}}
ulimit -n 65536; eval "${KUBERAY_GEN_RAY_START_CMD/--block/}" && exec splitserve up --address auto --config {{ include "splitserve.configDir" . }}/cluster.yaml --host 0.0.0.0 --worker-host auto
{{- if .Values.tls.existingSecret }} --tls-cert /etc/splitserve-tls/tls.crt --tls-key /etc/splitserve-tls/tls.key{{ end }}
{{- end -}}

{{/*
The router's public TLS (tls.existingSecret), as its in-cluster clients see it. They dial and verify the
Service's name, which the certificate must carry; the head pod resolves that name to itself (hostAliases), so
`splitserve status` there reaches its own router even before the Service has it as an endpoint.
*/}}
{{- define "splitserve.routerServerName" -}}
{{- printf "%s.%s.svc" (include "splitserve.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* The router's URL for the helm test Pod (through the Service) and `splitserve` in the head pod (itself). */}}
{{- define "splitserve.routerUrl" -}}
{{- if .root.Values.tls.existingSecret -}}
{{- printf "https://%s:%d" (include "splitserve.routerServerName" .root) (int .root.Values.router.httpPort) -}}
{{- else -}}
{{- printf "http://%s:%d" .host (int .root.Values.router.httpPort) -}}
{{- end -}}
{{- end -}}

{{/* Where a pod that mounts the router-tls Secret finds the CA of the router's certificate; empty: the system's CAs. */}}
{{- define "splitserve.routerCAFile" -}}
{{- if and .Values.tls.existingSecret .Values.tls.caKey -}}
{{- printf "/etc/splitserve-tls/%s" .Values.tls.caKey -}}
{{- end -}}
{{- end -}}

{{/* Data-plane trust, in every pod: the cluster secret as a file, mutual-TLS files (env entries). */}}
{{- define "splitserve.trustEnv" -}}
{{- with .Values.clusterSecret.existingSecret }}
- name: SPLITSERVE_CLUSTER_SECRET_FILE
  value: /etc/splitserve-cluster-secret/{{ $.Values.clusterSecret.secretKey }}
{{- end }}
{{- if .Values.clusterTLS.existingSecret }}
- name: SPLITSERVE_TLS_CERT
  value: /etc/splitserve-cluster-tls/tls.crt
- name: SPLITSERVE_TLS_KEY
  value: /etc/splitserve-cluster-tls/tls.key
- name: SPLITSERVE_TLS_CA
  value: /etc/splitserve-cluster-tls/ca.crt
{{- with .Values.clusterTLS.serverName }}
- name: SPLITSERVE_TLS_SERVER_NAME
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "splitserve.trustVolumeMounts" -}}
{{- if .Values.clusterSecret.existingSecret }}
- name: cluster-secret
  mountPath: /etc/splitserve-cluster-secret
  readOnly: true
{{- end }}
{{- if .Values.clusterTLS.existingSecret }}
- name: cluster-tls
  mountPath: /etc/splitserve-cluster-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "splitserve.trustVolumes" -}}
{{- with .Values.clusterSecret.existingSecret }}
- name: cluster-secret
  secret:
    secretName: {{ . }}
    defaultMode: 0400
{{- end }}
{{- with .Values.clusterTLS.existingSecret }}
- name: cluster-tls
  secret:
    secretName: {{ . }}
    defaultMode: 0400
{{- end }}
{{- end -}}

{{/* A worker pod is a plain Ray node; `--block` keeps `ray start` in the foreground. */}}
{{- define "splitserve.workerScript" -}}
ulimit -n 65536; eval "$KUBERAY_GEN_RAY_START_CMD"
{{- end -}}

{{/*
The `helm test` Pod's Python (the image has no curl): /health, /ready (a decode worker serves) and
/v1/models through the Service, the last with the release's first API key; any HTTP error fails it. Over
HTTPS it verifies the router's certificate with $SPLITSERVE_ROUTER_CA, else the system's CAs.
*/}}
{{- define "splitserve.testScript" -}}
import json, os, ssl, urllib.request
url = os.environ["SPLITSERVE_URL"]
key = os.environ.get("SPLITSERVE_API_KEYS", "").split(",")[0]
tls = ssl.create_default_context(cafile=os.environ.get("SPLITSERVE_ROUTER_CA"))
for path in ("/health", "/ready"):
    urllib.request.urlopen(url + path, timeout=10, context=tls).read()
request = urllib.request.Request(url + "/v1/models", headers={"Authorization": "Bearer " + key} if key else {})
with urllib.request.urlopen(request, timeout=10, context=tls) as response:
    models = [model["id"] for model in json.load(response)["data"]]
if not models:
    raise SystemExit("the router lists no model")
print("splitserve answers through its Service, serving", models)
{{- end -}}

{{/* Pod resources (dict "resources" R "gpus" N): R's requests and limits, plus N nvidia.com/gpu in both. */}}
{{- define "splitserve.podResources" -}}
{{- $gpus := int .gpus -}}
{{- range $section := list "requests" "limits" }}
{{ $section }}:
  {{- range $name, $quantity := index $.resources $section }}
  {{ $name }}: {{ $quantity | quote }}
  {{- end }}
  {{- if gt $gpus 0 }}
  nvidia.com/gpu: {{ $gpus | quote }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Pod placement (nodeSelector, tolerations, affinity) of a group's values. */}}
{{- define "splitserve.placement" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "splitserve.modelVolumeMount" -}}
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "splitserve.modelVolume" -}}
{{- if .Values.model.volume }}
- name: model
  {{- toYaml .Values.model.volume | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The image runs as uid 1000 (deploy/Dockerfile). */}}
{{- define "splitserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
{{- end -}}

{{/* Checks the values cannot express on their own; an error here stops `helm install`. */}}
{{- define "splitserve.validate" -}}
{{- range $role := list "prefill" "decode" }}
{{- $pool := index $.Values $role }}
{{- if not (and (le (int $pool.minReplicas) (int $pool.replicas)) (le (int $pool.replicas) (int $pool.maxReplicas))) }}
{{- fail (printf "%s: need minReplicas <= replicas <= maxReplicas, got %d, %d, %d" $role (int $pool.minReplicas) (int $pool.replicas) (int $pool.maxReplicas)) }}
{{- end }}
{{- if and (eq $.Values.model.device "cuda") (lt (int $pool.gpusPerWorker) 1) }}
{{- fail (printf "%s: model.device cuda needs gpusPerWorker >= 1" $role) }}
{{- end }}
{{- end }}
{{- if lt (int .Values.decode.minReplicas) 1 }}
{{- fail "decode: minReplicas must be at least 1 (the router needs a decode worker)" }}
{{- end }}
{{- if eq .Values.prefill.rayResource .Values.decode.rayResource }}
{{- fail "prefill.rayResource and decode.rayResource must differ: each pool is pinned to its own worker group" }}
{{- end }}
{{- if and .Values.apiKeys.create .Values.apiKeys.existingSecret }}
{{- fail "apiKeys: set either create or existingSecret, not both" }}
{{- end }}
{{- if include "splitserve.metricsNeedKey" . }}
{{- if .Values.metrics.podAnnotations }}
{{- fail "metrics.podAnnotations: an annotation-discovered scrape sends no API key, and /metrics wants one (API keys set, router.openMetrics false): set router.openMetrics true, or metrics.podAnnotations false and use the PodMonitor" }}
{{- end }}
{{- if and .Values.metrics.podMonitor.enabled (not (include "splitserve.metricsTokenSecret" .)) }}
{{- fail "metrics.podMonitor: /metrics wants an API key (router.openMetrics false): set metrics.podMonitor.bearerTokenSecret.name to a Secret holding one, or use apiKeys.create" }}
{{- end }}
{{- end }}
{{- if and .Values.apiKeys.create (empty .Values.apiKeys.keys) }}
{{- fail "apiKeys.create needs at least one key in apiKeys.keys" }}
{{- end }}
{{- end -}}
