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
{{- with .Values.model.servedName }}
served_model_name: {{ toJson . }}
{{- end }}
{{- with .Values.model.dtype }}
dtype: {{ toJson . }}
{{- end }}
device: {{ toJson .Values.model.device }}
transport: {{ toJson .Values.transport }}
start_timeout_s: {{ int .Values.startTimeoutSeconds }}
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

{{/*
terminationGracePeriodSeconds of every pod: the longest `splitserve up` in the head takes to stop on SIGTERM
(router/server.py, Router.stop; cluster/up.py), derived from the values that set it, so Kubernetes kills nothing
partway. The router serves on for router.shutdownDelaySeconds, gives the requests in flight
router.settings.shutdown_grace_s (unset: router/config.py's default, 25 s), then 4 s for the requests it cut to unwind
(2 x router/server.py's CUT_UNWIND_S); then `up` stops the workers (the controller waits up to 3 s for each, all at
once, then kills it) and leaves Ray: 20 s kept for that. A worker pod's PID 1 (bash) ignores SIGTERM, so its workers
serve on until the head stops them; given less, they would be killed under the head's drain when every pod stops at
once (helm uninstall, upgradeStrategy Recreate). tests/deploy/test_pod_timing.py holds the 25 and the 4 to their
owners.
*/}}
{{- define "splitserve.terminationGraceSeconds" -}}
{{- $grace := 25.0 -}}
{{- if hasKey .Values.router.settings "shutdown_grace_s" -}}
{{- $grace = float64 .Values.router.settings.shutdown_grace_s -}}
{{- end -}}
{{- addf (float64 .Values.router.shutdownDelaySeconds) $grace | ceil | int | add 4 20 -}}
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

{{/*
Ray's own ports in the head pod (KubeRay 1.7's defaults; the autoscaler sidecar shares the pod's network).
"declared": the head container lists them by name; the others are bound all the same. The router's ports must
be none of them.
*/}}
{{- define "splitserve.rayHeadPorts" -}}
{{- toJson (dict
  "declared" (dict "gcs-server" 6379 "dashboard" 8265 "client" 10001 "metrics" 8080)
  "bound" (dict "dashboard-agent" 52365 "autoscaler-metrics" 44217 "dashboard-metrics" 44227)) -}}
{{- end -}}

{{/* Ray's metrics port on every pod (KubeRay's --metrics-export-port). */}}
{{- define "splitserve.rayMetricsPort" -}}
{{- (include "splitserve.rayHeadPorts" . | fromJson).declared.metrics | int -}}
{{- end -}}

{{/*
Environment variables the chart or KubeRay set in the pods, with the value that owns each: head.env and
<pool>.env may not name them (a second copy would shadow or be shadowed by the first).
*/}}
{{- define "splitserve.reservedEnv" -}}
{{- toJson (dict
  "SPLITSERVE_URL" "the chart, from router.httpPort and tls.existingSecret"
  "SPLITSERVE_ROUTER_CA" "the chart, from tls.caKey"
  "SPLITSERVE_API_KEYS" "the chart, from apiKeys"
  "SPLITSERVE_API_KEYS_FILE" "the chart, from apiKeys"
  "SPLITSERVE_ADMIN_TOKEN" "the chart, from adminToken"
  "SPLITSERVE_ADMIN_TOKEN_FILE" "the chart, from adminToken"
  "SPLITSERVE_CLUSTER_SECRET" "the chart, from clusterSecret"
  "SPLITSERVE_CLUSTER_SECRET_FILE" "the chart, from clusterSecret"
  "SPLITSERVE_TLS_CERT" "the chart, from clusterTLS.existingSecret"
  "SPLITSERVE_TLS_KEY" "the chart, from clusterTLS.existingSecret"
  "SPLITSERVE_TLS_CA" "the chart, from clusterTLS.existingSecret"
  "SPLITSERVE_TLS_SERVER_NAME" "the chart, from clusterTLS.serverName"
  "KUBERAY_GEN_RAY_START_CMD" "KubeRay (the pod's ray start)"
  "RAY_ADDRESS" "KubeRay (the head's address)"
  "RAY_PORT" "KubeRay (the head's address)"
  "RAY_IP" "KubeRay (the head's address)"
  "FQ_RAY_IP" "KubeRay (the head's address)"
  "RAY_CLUSTER_NAME" "KubeRay (the RayCluster's name)"
  "RAY_CLOUD_INSTANCE_ID" "KubeRay (the pod's name)"
  "RAY_NODE_TYPE_NAME" "KubeRay (the worker group)") -}}
{{- end -}}

{{/* "true" when the chart's API-keys Secret also holds the PodMonitor's bearer token (its first key). */}}
{{- define "splitserve.writesMetricsKey" -}}
{{- if and .Values.apiKeys.create (not .Values.router.openMetrics) (not .Values.metrics.podMonitor.bearerTokenSecret.name) -}}true{{- end -}}
{{- end -}}

{{/* The data of the chart's API-keys Secret: secret.yaml writes it, the head's checksum/api-keys hashes it. */}}
{{- define "splitserve.apiKeysSecretData" -}}
# SPLITSERVE_API_KEYS: the keys, comma-separated.
{{ .Values.apiKeys.secretKey }}: {{ join "," .Values.apiKeys.keys | b64enc }}
{{- if include "splitserve.writesMetricsKey" . }}
# The PodMonitor's bearer token while /metrics wants a key: the first API key.
{{ .Values.metrics.podMonitor.bearerTokenSecret.key }}: {{ first .Values.apiKeys.keys | default "" | b64enc }}
{{- end }}
{{- end -}}

{{/* A CPU quantity in millicores ("2", 2, "1.5", "500m"); empty for any other form. */}}
{{- define "splitserve.millicpus" -}}
{{- $quantity := toString . -}}
{{- if regexMatch "^[0-9]+m$" $quantity -}}
{{- trimSuffix "m" $quantity | int -}}
{{- else if regexMatch "^[0-9]+(\\.[0-9]+)?$" $quantity -}}
{{- mulf (float64 $quantity) 1000 | int -}}
{{- end -}}
{{- end -}}

{{/* Container env entries given in the values (head.env, <pool>.env): none the chart or KubeRay sets, none twice. */}}
{{- define "splitserve.validateEnv" -}}
{{- $reserved := include "splitserve.reservedEnv" .root | fromJson -}}
{{- $seen := dict -}}
{{- range $entry := .env }}
{{- with get $reserved $entry.name }}
{{- fail (printf "%s: %s is set by %s; it cannot be set here too" $.key $entry.name .) }}
{{- end }}
{{- if hasKey $seen $entry.name }}
{{- fail (printf "%s: %s is given twice" $.key $entry.name) }}
{{- end }}
{{- $_ := set $seen $entry.name true }}
{{- end }}
{{- end -}}

{{/* One pool's checks: replicas in order, its GPUs and CPUs agreeing with the device, threads and pod. */}}
{{- define "splitserve.validatePool" -}}
{{- $role := .role -}}
{{- $pool := index .root.Values $role -}}
{{- $device := .root.Values.model.device -}}
{{- if not (and (le (int $pool.minReplicas) (int $pool.replicas)) (le (int $pool.replicas) (int $pool.maxReplicas))) }}
{{- fail (printf "%s: need minReplicas <= replicas <= maxReplicas, got %d, %d, %d" $role (int $pool.minReplicas) (int $pool.replicas) (int $pool.maxReplicas)) }}
{{- end }}
{{- if and (eq $device "cuda") (lt (int $pool.gpusPerWorker) 1) }}
{{- fail (printf "%s: model.device cuda needs gpusPerWorker >= 1" $role) }}
{{- end }}
{{- if and (eq $device "cpu") (gt (int $pool.gpusPerWorker) 0) }}
{{- fail (printf "%s.gpusPerWorker is %d but model.device is cpu: each pod would hold a GPU its worker never uses; set model.device cuda (and image.variant cuda) or %s.gpusPerWorker 0" $role (int $pool.gpusPerWorker) $role) }}
{{- end }}
{{- if gt (int $pool.threads) (int $pool.cpusPerWorker) }}
{{- fail (printf "%s.threads (%d) is more than %s.cpusPerWorker (%d), the CPUs Ray gives the worker: lower %s.threads or raise %s.cpusPerWorker" $role (int $pool.threads) $role (int $pool.cpusPerWorker) $role $role) }}
{{- end }}
{{- $requested := include "splitserve.millicpus" $pool.resources.requests.cpu }}
{{- if not $requested }}
{{- fail (printf "%s.resources.requests.cpu %v: give CPUs as a number (2, 1.5) or in millicores (500m)" $role $pool.resources.requests.cpu) }}
{{- end }}
{{- if gt (mul (int $pool.cpusPerWorker) 1000) (int $requested) }}
{{- fail (printf "%s.cpusPerWorker (%d) is more than %s.resources.requests.cpu (%v): Ray would offer CPUs the pod is not given; raise %s.resources.requests.cpu or lower %s.cpusPerWorker" $role (int $pool.cpusPerWorker) $role $pool.resources.requests.cpu $role $role) }}
{{- end }}
{{- include "splitserve.validateEnv" (dict "root" .root "key" (printf "%s.env" $role) "env" ($pool.env | default list)) }}
{{- end -}}

{{/* The model: the image that can run its device, and a path that lies on the mounted volume. */}}
{{- define "splitserve.validateModel" -}}
{{- $model := .Values.model -}}
{{- if ne (eq $model.device "cuda") (eq .Values.image.variant "cuda") }}
{{- fail (printf "model.device %s and image.variant %s disagree: the cpu image has a CPU-only torch, and the cuda image is for GPU pods; set both to cpu or both to cuda" $model.device .Values.image.variant) }}
{{- end }}
{{- $mount := clean $model.mountPath }}
{{- $under := printf "%s/" (trimSuffix "/" $mount) }}
{{- if hasPrefix "/" $model.name }}
{{- if not $model.volume }}
{{- fail (printf "model.name %s is a path, but model.volume is empty: nothing is mounted there; set model.volume (mounted at model.mountPath %s) to the volume holding it" $model.name $mount) }}
{{- end }}
{{- $path := clean $model.name }}
{{- if not (or (eq $path $mount) (hasPrefix $under $path)) }}
{{- fail (printf "model.name %s is not under model.mountPath %s, where model.volume is mounted: the pods would find no model there" $model.name $mount) }}
{{- end }}
{{- else if $model.volume }}
{{- fail (printf "model.volume is mounted at model.mountPath %s, but model.name %s is not a path under it: set model.name to the model directory there (e.g. %smodel), or leave model.volume empty" $mount $model.name $under) }}
{{- end }}
{{- end -}}

{{/* The router's two ports: distinct, and none of Ray's in the head pod. */}}
{{- define "splitserve.validatePorts" -}}
{{- $http := int .Values.router.httpPort -}}
{{- $grpc := int .Values.router.grpcPort -}}
{{- if eq $http $grpc }}
{{- fail (printf "router.httpPort and router.grpcPort are both %d: give them different ports" $http) }}
{{- end }}
{{- $ray := include "splitserve.rayHeadPorts" . | fromJson }}
{{- range $name, $port := merge (dict) $ray.declared $ray.bound }}
{{- range $key, $mine := dict "router.httpPort" $http "router.grpcPort" $grpc }}
{{- if eq (int $port) $mine }}
{{- fail (printf "%s %d is Ray's %s port in the head pod: pick another port" $key $mine $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* API keys: from one place, and never given only to be ignored. */}}
{{- define "splitserve.validateApiKeys" -}}
{{- $keys := .Values.apiKeys -}}
{{- if and $keys.create $keys.existingSecret }}
{{- fail "apiKeys.create and apiKeys.existingSecret are both set: the keys come from one Secret; set either" }}
{{- end }}
{{- if and $keys.create (empty $keys.keys) }}
{{- fail "apiKeys.create needs at least one key in apiKeys.keys (the router refuses an empty SPLITSERVE_API_KEYS)" }}
{{- end }}
{{- if and (not $keys.create) (not (empty $keys.keys)) }}
{{- if $keys.existingSecret }}
{{- fail (printf "apiKeys.keys is set beside apiKeys.existingSecret: the keys come from the Secret %s, so apiKeys.keys would be ignored; leave apiKeys.keys empty, or drop apiKeys.existingSecret and set apiKeys.create true" $keys.existingSecret) }}
{{- end }}
{{- fail "apiKeys.keys is set but apiKeys.create is false: no Secret would hold the keys and the API would stay open; set apiKeys.create true" }}
{{- end }}
{{- if and (include "splitserve.writesMetricsKey" .) (eq .Values.metrics.podMonitor.bearerTokenSecret.key $keys.secretKey) }}
{{- fail (printf "metrics.podMonitor.bearerTokenSecret.key and apiKeys.secretKey are both %s: the chart's API-keys Secret holds both the keys and the PodMonitor's token; give them different names" $keys.secretKey) }}
{{- end }}
{{- end -}}

{{/* Metrics: a scrape the chart sets up is one that can authenticate and get through the NetworkPolicy. */}}
{{- define "splitserve.validateMetrics" -}}
{{- if include "splitserve.metricsNeedKey" . }}
{{- if .Values.metrics.podAnnotations }}
{{- fail "metrics.podAnnotations: an annotation-discovered scrape sends no API key, and /metrics wants one (API keys set, router.openMetrics false): set router.openMetrics true, or metrics.podAnnotations false and use the PodMonitor" }}
{{- end }}
{{- if and .Values.metrics.podMonitor.enabled (not (include "splitserve.metricsTokenSecret" .)) }}
{{- fail "metrics.podMonitor: /metrics wants an API key (router.openMetrics false): set metrics.podMonitor.bearerTokenSecret.name to a Secret holding one, or use apiKeys.create" }}
{{- end }}
{{- end }}
{{- $policy := .Values.networkPolicy }}
{{- if not $policy.enabled }}
{{- range $key := list "routerFrom" "metricsFrom" }}
{{- if not (empty (get $policy $key)) }}
{{- fail (printf "networkPolicy.%s is set but networkPolicy.enabled is false: no NetworkPolicy would carry it" $key) }}
{{- end }}
{{- end }}
{{- else if and (not (empty $policy.routerFrom)) (empty $policy.metricsFrom) }}
{{- range $key, $on := dict "metrics.podMonitor.enabled" .Values.metrics.podMonitor.enabled "metrics.podAnnotations" .Values.metrics.podAnnotations }}
{{- if $on }}
{{- fail (printf "networkPolicy.routerFrom admits only its peers to the router's http port, where Prometheus scrapes /metrics (%s is true): set networkPolicy.metricsFrom to Prometheus' pods (e.g. [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]), or set %s false" $key $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Checks the values cannot express on their own; an error here stops `helm install`. */}}
{{- define "splitserve.validate" -}}
{{- range $role := list "prefill" "decode" }}
{{- include "splitserve.validatePool" (dict "root" $ "role" $role) }}
{{- end }}
{{- if lt (int .Values.decode.minReplicas) 1 }}
{{- fail "decode: minReplicas must be at least 1 (the router needs a decode worker)" }}
{{- end }}
{{- if eq .Values.prefill.rayResource .Values.decode.rayResource }}
{{- fail "prefill.rayResource and decode.rayResource must differ: each pool is pinned to its own worker group" }}
{{- end }}
{{- include "splitserve.validateModel" . }}
{{- include "splitserve.validatePorts" . }}
{{- include "splitserve.validateApiKeys" . }}
{{- include "splitserve.validateMetrics" . }}
{{- include "splitserve.validateEnv" (dict "root" . "key" "head.env" "env" (.Values.head.env | default list)) }}
{{- if not .Values.autoscaler.enabled }}
{{- range $key := list "ttftSeconds" "tpotSeconds" }}
{{- if not (empty (get $.Values.slo $key)) }}
{{- fail (printf "slo.%s turns the SLO planner on, which sizes its pool between minReplicas and maxReplicas, but autoscaler.enabled is false: no worker pod beyond replicas would ever be made; set autoscaler.enabled true or slo.%s null" $key $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $key := keys .Values.head.podAnnotations | sortAlpha }}
{{- if or (hasPrefix "checksum/" $key) (and $.Values.metrics.podAnnotations (hasPrefix "prometheus.io/" $key)) }}
{{- fail (printf "head.podAnnotations: %s is the chart's own annotation (checksum/* from the config and Secrets, prometheus.io/* from metrics.podAnnotations)" $key) }}
{{- end }}
{{- end }}
{{- end -}}
