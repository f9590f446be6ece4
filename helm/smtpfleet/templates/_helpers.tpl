{{/* Names and labels. */}}
{{- define "smtpfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "smtpfleet.fullname" -}}
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

{{- define "smtpfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "smtpfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "smtpfleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "smtpfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "smtpfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "smtpfleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "smtpfleet.redisSecretName" -}}
{{- default (printf "%s-redis" (include "smtpfleet.fullname" .)) .Values.redis.existingSecret }}
{{- end }}

{{/* terminationGracePeriodSeconds: given, or delay + drain grace + 15 s. */}}
{{- define "smtpfleet.terminationGrace" -}}
{{- $drain := add (int .Values.drain.preStopDelaySeconds) (int (ceil .Values.drain.graceSeconds)) }}
{{- if .Values.terminationGracePeriodSeconds }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- else }}
{{- add $drain 15 }}
{{- end }}
{{- end }}

{{/* Every check that refuses to render, with a message that says what to change. */}}
{{- define "smtpfleet.validate" -}}
{{- $v := .Values }}
{{- if and (not $v.redis.url) (not $v.redis.existingSecret) (not $v.redis.sentinel.enabled) (not $v.redis.cluster.enabled) }}
{{- fail "redis: set redis.url (redis://HOST:6379/0) or redis.existingSecret. The chart bundles no Redis: a single Redis pod is not HA, and the queue must outlive any node." }}
{{- end }}
{{- if or $v.redis.sentinel.enabled $v.redis.cluster.enabled }}
{{- fail "redis.sentinel / redis.cluster: this smtpfleet version connects to one Redis URL (redis.url). Point it at the primary endpoint your HA Redis offers (a managed service's primary endpoint, or a Sentinel-aware proxy); see docs/deployment.md." }}
{{- end }}
{{- $drain := add (int $v.drain.preStopDelaySeconds) (int (ceil $v.drain.graceSeconds)) }}
{{- if and $v.terminationGracePeriodSeconds (le (int $v.terminationGracePeriodSeconds) $drain) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than drain.preStopDelaySeconds + drain.graceSeconds (%d), or the kubelet kills nodes in the middle of their drain" (int $v.terminationGracePeriodSeconds) $drain) }}
{{- end }}
{{- range $key := list "listen" "accepted_domains" "relay_networks" }}
{{- if hasKey (default dict $v.config.inbound) $key }}
{{- fail (printf "config.inbound.%s: set it with the chart's smtp.* values (smtp.listeners, smtp.acceptedDomains, smtp.relayNetworks)" $key) }}
{{- end }}
{{- end }}
{{- range $key := list "http" "relays" }}
{{- if hasKey $v.config $key }}
{{- fail (printf "config.%s: the chart sets it (relays: the relays value; http: metrics.port)" $key) }}
{{- end }}
{{- end }}
{{- if hasKey (default dict $v.config.redis) "url" }}
{{- fail "config.redis.url: use redis.url or redis.existingSecret (a URL may carry a password; it goes in a Secret)" }}
{{- end }}
{{- if or (hasKey (default dict $v.config.node) "id") (hasKey (default dict $v.config.node) "drain_grace_s") }}
{{- fail "config.node.id / config.node.drain_grace_s: the chart sets them (the pod name; drain.graceSeconds)" }}
{{- end }}
{{- if hasKey (default dict $v.config.queue) "durability" }}
{{- fail "config.queue.durability: use the durability value" }}
{{- end }}
{{- if not (or $v.smtp.listeners.mx.enabled $v.smtp.listeners.submission.enabled) }}
{{- fail "smtp.listeners: enable mx or submission (or both)" }}
{{- end }}
{{- if not $v.listenerProfiles }}
{{- if $v.smtp.listeners.submission.enabled }}
{{- fail "smtp.listeners.submission needs listener profiles (STARTTLS + AUTH on 587), which this smtpfleet image does not have yet: set listenerProfiles=true once it does" }}
{{- end }}
{{- if $v.proxyProtocol.enabled }}
{{- fail "proxyProtocol.enabled needs inbound.listeners[].proxy_protocol, which this smtpfleet image does not have yet: set listenerProfiles=true once it does, or keep the client IP with service.externalTrafficPolicy=Local" }}
{{- end }}
{{- if $v.tls.enabled }}
{{- fail "tls.enabled (inbound STARTTLS) needs listener profiles, which this smtpfleet image does not have yet: set listenerProfiles=true once it does" }}
{{- end }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) }}
{{- fail "tls.enabled: set tls.existingSecret to a kubernetes.io/tls Secret" }}
{{- end }}
{{- /* The open-relay guard: behind a LoadBalancer or NodePort with externalTrafficPolicy
       Cluster, kube-proxy SNATs every connection, so the node sees a node IP of the cluster
       (usually inside 10.0.0.0/8) instead of the client's. relay_networks would then let
       the whole Internet relay. Keep the IP (Local) or carry it (PROXY protocol). */}}
{{- $exposed := has $v.service.type (list "LoadBalancer" "NodePort") }}
{{- if and $exposed (ne $v.service.externalTrafficPolicy "Local") (not $v.proxyProtocol.enabled) }}
{{- if $v.smtp.relayNetworks }}
{{- fail (printf "refusing to render: service.type %s with externalTrafficPolicy %s and no PROXY protocol hides the client IP (every connection seems to come from a cluster node), but smtp.relayNetworks %v decides who may relay by that IP: this would be an open relay. Set service.externalTrafficPolicy=Local, or proxyProtocol.enabled=true (and PROXY protocol at the balancer), or empty smtp.relayNetworks." $v.service.type (default "Cluster" $v.service.externalTrafficPolicy) $v.smtp.relayNetworks) }}
{{- end }}
{{- end }}
{{- range $v.relays }}
{{- if and .auth .auth.password .auth.existingSecret }}
{{- fail (printf "relays[%s].auth: set password or existingSecret, not both" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The node configuration file (the ConfigMap's smtpfleet.yaml). Secrets are not in it:
     redis.url and relay passwords come from the environment (SMTPFLEET_* from Secrets). */}}
{{- define "smtpfleet.config" -}}
{{- $v := .Values }}
{{- $relays := list }}
{{- range $v.relays }}
{{- $relay := omit . "auth" }}
{{- if and .auth .auth.username }}
{{- $relay = set $relay "username" .auth.username }}
{{- end }}
{{- $relays = append $relays $relay }}
{{- end }}
{{- $inbound := dict "accepted_domains" $v.smtp.acceptedDomains "relay_networks" $v.smtp.relayNetworks }}
{{- if $v.listenerProfiles }}
{{- /* Listener profiles (inbound.listeners): rendered once the node has them. */}}
{{- $listeners := list }}
{{- range $profile := list "mx" "submission" }}
{{- $l := index $v.smtp.listeners $profile }}
{{- if $l.enabled }}
{{- $listener := dict "name" $profile "profile" $profile "listen" (printf "0.0.0.0:%d" (int $l.containerPort)) }}
{{- if $v.proxyProtocol.enabled }}
{{- $_ := set $listener "proxy_protocol" true }}
{{- $_ := set $listener "trusted_proxies" $v.proxyProtocol.trustedProxies }}
{{- end }}
{{- if $v.tls.enabled }}
{{- $_ := set $listener "tls" (dict "cert_file" "/etc/smtpfleet/tls/tls.crt" "key_file" "/etc/smtpfleet/tls/tls.key") }}
{{- end }}
{{- $listeners = append $listeners $listener }}
{{- end }}
{{- end }}
{{- $_ := set $inbound "listeners" $listeners }}
{{- else }}
{{- $_ := set $inbound "listen" (list (printf "0.0.0.0:%d" (int $v.smtp.listeners.mx.containerPort))) }}
{{- end }}
{{- $chart := dict
  "node" (dict "drain_grace_s" $v.drain.graceSeconds)
  "inbound" $inbound
  "queue" (dict "durability" $v.durability)
  "relays" $relays
  "http" (dict "listen" (printf "0.0.0.0:%d" (int $v.metrics.port)))
}}
{{- $config := mergeOverwrite (deepCopy $v.config) $chart }}
{{- toYaml $config }}
{{- end }}

{{/* The relays' distinct ports, as a JSON array (the NetworkPolicy's egress). */}}
{{- define "smtpfleet.relayPorts" -}}
{{- $ports := list }}
{{- range .Values.relays }}
{{- $ports = append $ports (int (default 25 .port)) }}
{{- end }}
{{- toJson ($ports | uniq) }}
{{- end }}
