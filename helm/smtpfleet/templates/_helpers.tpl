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

{{/* The SMTP listeners, in a fixed order, as a JSON array of
     {key (the value's name), name (the port's), port, containerPort, profile, implicit_tls,
     require_tls}: the ConfigMap, the
     container's ports, the Service and the NetworkPolicy all read this one list. */}}
{{- define "smtpfleet.listeners" -}}
{{- $v := .Values }}
{{- $profiles := dict "mx" "mx" "submission" "submission" "submissions" "submission" }}
{{- $listeners := list }}
{{- range $name := list "mx" "submission" "submissions" }}
{{- $l := index $v.smtp.listeners $name }}
{{- if and $l $l.enabled }}
{{- $listeners = append $listeners (dict
  "key" $name
  "name" (ternary "smtp" $name (eq $name "mx"))
  "port" (int $l.port)
  "containerPort" (int $l.containerPort)
  "profile" (index $profiles $name)
  "implicit_tls" (eq $name "submissions")
  "require_tls" (default false $l.requireTls)
) }}
{{- end }}
{{- end }}
{{- toJson $listeners }}
{{- end }}

{{/* Every check that refuses to render, with a message that says what to change. */}}
{{- define "smtpfleet.validate" -}}
{{- $v := .Values }}
{{- $sentinel := $v.redis.sentinel.enabled }}
{{- if $v.redis.cluster.enabled }}
{{- fail "redis.cluster: Redis Cluster is not supported: a node talks to one primary, directly (redis.url) or found through Sentinel. Use a primary with replicas under Sentinel (redis.sentinel.enabled, see docs/cluster.md) or one primary endpoint (redis.url)." }}
{{- end }}
{{- if $sentinel }}
{{- if not $v.redis.sentinel.addresses }}
{{- fail "redis.sentinel.addresses: list the Sentinels as HOST:PORT (e.g. [sentinel-0.sentinel:26379, sentinel-1.sentinel:26379, sentinel-2.sentinel:26379])" }}
{{- end }}
{{- if not $v.redis.sentinel.masterName }}
{{- fail "redis.sentinel.masterName: the name the Sentinels monitor the primary under (sentinel monitor NAME ...)" }}
{{- end }}
{{- if or $v.redis.url $v.redis.existingSecret }}
{{- fail "redis.url / redis.existingSecret: with redis.sentinel the primary comes from the Sentinels, and a password in a URL is not used: set redis.sentinel.db and redis.sentinel.tls, and the passwords with redis.passwordSecret and redis.sentinel.passwordSecret" }}
{{- end }}
{{- else if and (not $v.redis.url) (not $v.redis.existingSecret) }}
{{- fail "redis: set redis.url (redis://HOST:6379/0) or redis.existingSecret, or redis.sentinel. The chart bundles no Redis: a single Redis pod is not HA, and the queue must outlive any node." }}
{{- end }}
{{- $drain := add (int $v.drain.preStopDelaySeconds) (int (ceil $v.drain.graceSeconds)) }}
{{- if and $v.terminationGracePeriodSeconds (le (int $v.terminationGracePeriodSeconds) $drain) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than drain.preStopDelaySeconds + drain.graceSeconds (%d), or the kubelet kills nodes in the middle of their drain" (int $v.terminationGracePeriodSeconds) $drain) }}
{{- end }}
{{- range $key := list "listen" "listeners" "accepted_domains" "relay_networks" "trusted_proxies" }}
{{- if hasKey (default dict $v.config.inbound) $key }}
{{- fail (printf "config.inbound.%s: set it with the chart's values (smtp.listeners, smtp.acceptedDomains, smtp.relayNetworks, proxyProtocol.trustedProxies)" $key) }}
{{- end }}
{{- end }}
{{- $inboundConfig := default dict $v.config.inbound }}
{{- if or (hasKey (default dict $inboundConfig.tls) "cert_file") (hasKey (default dict $inboundConfig.tls) "key_file") }}
{{- fail "config.inbound.tls.cert_file / key_file: use tls.enabled and tls.existingSecret (a kubernetes.io/tls Secret, mounted at /etc/smtpfleet/tls)" }}
{{- end }}
{{- if hasKey (default dict $inboundConfig.tls) "ticket_key_file" }}
{{- fail "config.inbound.tls.ticket_key_file: use tls.ticketKeySecret (a Secret holding 80 random bytes, mounted at /etc/smtpfleet/tls-ticket)" }}
{{- end }}
{{- if hasKey (default dict $inboundConfig.auth) "users_file" }}
{{- fail "config.inbound.auth.users_file: use smtp.auth.existingSecret (a Secret holding the users file, mounted at /etc/smtpfleet/auth)" }}
{{- end }}
{{- range $key := list "http" "relays" }}
{{- if hasKey $v.config $key }}
{{- fail (printf "config.%s: the chart sets it (relays: the relays value; http: metrics.port)" $key) }}
{{- end }}
{{- end }}
{{- range $key := list "url" "password" "sentinel_password" }}
{{- if hasKey (default dict $v.config.redis) $key }}
{{- fail (printf "config.redis.%s: use redis.url or redis.existingSecret, redis.passwordSecret, redis.sentinel.passwordSecret (URLs and passwords go in Secrets, never in the ConfigMap)" $key) }}
{{- end }}
{{- end }}
{{- range $key := list "sentinels" "master_name" "username" "sentinel_username" }}
{{- if hasKey (default dict $v.config.redis) $key }}
{{- fail (printf "config.redis.%s: use the chart's redis.sentinel.* and redis.username values" $key) }}
{{- end }}
{{- end }}
{{- if or (hasKey (default dict $v.config.node) "id") (hasKey (default dict $v.config.node) "drain_grace_s") }}
{{- fail "config.node.id / config.node.drain_grace_s: the chart sets them (the pod name; drain.graceSeconds)" }}
{{- end }}
{{- if hasKey (default dict $v.config.queue) "durability" }}
{{- fail "config.queue.durability: use the durability value" }}
{{- end }}
{{- $listeners := include "smtpfleet.listeners" . | fromJsonArray }}
{{- if not $listeners }}
{{- fail "smtp.listeners: enable mx, submission or submissions (or several)" }}
{{- end }}
{{- $needTls := list }}
{{- $submission := list }}
{{- range $listeners }}
{{- if or .implicit_tls .require_tls (eq .profile "submission") }}
{{- $needTls = append $needTls (printf "smtp.listeners.%s" .key) }}
{{- end }}
{{- if eq .profile "submission" }}
{{- $submission = append $submission (printf "smtp.listeners.%s" .key) }}
{{- end }}
{{- end }}
{{- if and $needTls (not $v.tls.enabled) }}
{{- fail (printf "%s: needs a certificate: set tls.enabled=true and tls.existingSecret (a kubernetes.io/tls Secret)" (join ", " $needTls)) }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) }}
{{- fail "tls.enabled: set tls.existingSecret to a kubernetes.io/tls Secret (tls.crt, tls.key)" }}
{{- end }}
{{- if and $v.tls.ticketKeySecret (not $v.tls.enabled) }}
{{- fail "tls.ticketKeySecret: a ticket key needs a certificate: set tls.enabled=true and tls.existingSecret" }}
{{- end }}
{{- if and $submission (not $v.smtp.auth.existingSecret) }}
{{- fail (printf "%s: the submission profile needs SMTP AUTH users: set smtp.auth.existingSecret to a Secret whose key %s holds user:$argon2id$... lines" (join ", " $submission) (default "users" $v.smtp.auth.usersKey)) }}
{{- end }}
{{- if and $v.proxyProtocol.enabled (not $v.proxyProtocol.trustedProxies) }}
{{- fail "proxyProtocol.trustedProxies: list the CIDRs the balancer's connections arrive from (with externalTrafficPolicy Cluster: the cluster nodes' addresses); a PROXY header from anyone else is refused" }}
{{- end }}
{{- /* The open-relay guard: behind a LoadBalancer or NodePort with externalTrafficPolicy
       Cluster, kube-proxy SNATs every connection, so the node sees a node IP of the cluster
       (usually inside 10.0.0.0/8) instead of the client's. relay_networks would then let
       the whole Internet relay, on any listener. Keep the IP (Local) or carry it (PROXY
       protocol: proxy_protocol on the listeners and trusted_proxies set). */}}
{{- $exposed := has $v.service.type (list "LoadBalancer" "NodePort") }}
{{- $proxied := and $v.proxyProtocol.enabled $v.proxyProtocol.trustedProxies }}
{{- if and $exposed (ne $v.service.externalTrafficPolicy "Local") (not $proxied) }}
{{- if $v.smtp.relayNetworks }}
{{- fail (printf "refusing to render: service.type %s with externalTrafficPolicy %s and no PROXY protocol hides the client IP (every connection seems to come from a cluster node), but smtp.relayNetworks %v decides who may relay by that IP: this would be an open relay. Set service.externalTrafficPolicy=Local, or proxyProtocol.enabled=true with proxyProtocol.trustedProxies (and PROXY protocol at the balancer), or empty smtp.relayNetworks." $v.service.type (default "Cluster" $v.service.externalTrafficPolicy) $v.smtp.relayNetworks) }}
{{- end }}
{{- end }}
{{- range $v.relays }}
{{- if and .auth .auth.password .auth.existingSecret }}
{{- fail (printf "relays[%s].auth: set password or existingSecret, not both" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The node configuration file (the ConfigMap's smtpfleet.yaml). Secrets are not in it:
     the Redis URL, the Redis and Sentinel passwords and relay passwords come from the
     environment (SMTPFLEET_* from Secrets); TLS keys and AUTH users are mounted files. */}}
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
{{- $listeners := list }}
{{- range include "smtpfleet.listeners" . | fromJsonArray }}
{{- $listeners = append $listeners (dict
  "address" (printf "0.0.0.0:%d" (int .containerPort))
  "profile" .profile
  "implicit_tls" .implicit_tls
  "require_tls" .require_tls
  "proxy_protocol" (and $v.proxyProtocol.enabled true)
) }}
{{- end }}
{{- $_ := set $inbound "listeners" $listeners }}
{{- if $v.proxyProtocol.enabled }}
{{- $_ := set $inbound "trusted_proxies" $v.proxyProtocol.trustedProxies }}
{{- end }}
{{- if $v.tls.enabled }}
{{- $ticketKey := "" }}
{{- if $v.tls.ticketKeySecret }}
{{- $ticketKey = printf "/etc/smtpfleet/tls-ticket/%s" (default "ticket.key" $v.tls.ticketKeyKey) }}
{{- end }}
{{- $_ := set $inbound "tls" (dict "cert_file" "/etc/smtpfleet/tls/tls.crt" "key_file" "/etc/smtpfleet/tls/tls.key" "ticket_key_file" $ticketKey "reload_interval_s" $v.tls.reloadIntervalSeconds) }}
{{- end }}
{{- if $v.smtp.auth.existingSecret }}
{{- $_ := set $inbound "auth" (dict "users_file" (printf "/etc/smtpfleet/auth/%s" (default "users" $v.smtp.auth.usersKey))) }}
{{- end }}
{{- $redis := dict }}
{{- if $v.redis.username }}
{{- $_ := set $redis "username" $v.redis.username }}
{{- end }}
{{- if $v.redis.sentinel.enabled }}
{{- $s := $v.redis.sentinel }}
{{- /* With Sentinel, url only gives the database number and TLS (rediss://). */}}
{{- $_ := set $redis "url" (printf "%s://%s/%d" (ternary "rediss" "redis" (and $s.tls true)) $s.masterName (int $s.db)) }}
{{- $_ := set $redis "sentinels" $s.addresses }}
{{- $_ := set $redis "master_name" $s.masterName }}
{{- if $s.username }}
{{- $_ := set $redis "sentinel_username" $s.username }}
{{- end }}
{{- end }}
{{- $chart := dict
  "node" (dict "drain_grace_s" $v.drain.graceSeconds)
  "inbound" $inbound
  "queue" (dict "durability" $v.durability)
  "relays" $relays
  "http" (dict "listen" (printf "0.0.0.0:%d" (int $v.metrics.port)))
}}
{{- if $redis }}
{{- $_ := set $chart "redis" $redis }}
{{- end }}
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
