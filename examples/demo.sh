#!/bin/sh
# SPDX-License-Identifier: MIT
# The demo behind `make demo`, on an embedded Kafka (librdkafka's mock
# cluster, started by `deliveryevents mock-cluster`): the delivery service
# records its events in its own transactions, its bundled relay publishes
# them to Kafka as they commit, and `deliveryevents tail` reads the topic
# back, checking every delivery's events arrived in order.
# Usage: demo.sh BUILD_DIR
set -eu
build=${1:?usage: demo.sh BUILD_DIR}
tool="$build/deliveryevents"
work=$(mktemp -d "${TMPDIR:-/tmp}/de-demo-XXXXXX")
mock_pid=
cleanup() {
    exec 3>&- 2>/dev/null || true
    [ -n "$mock_pid" ] && wait "$mock_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "== embedded Kafka: librdkafka's mock cluster, 3 brokers, topic delivery.events (6 partitions)"
mkfifo "$work/mock.in"
"$tool" mock-cluster --brokers 3 --topic delivery.events:6 --until-stdin-eof \
    < "$work/mock.in" > "$work/mock.out" &
mock_pid=$!
exec 3> "$work/mock.in"   # the cluster lives as long as this stays open
i=0
until grep -q '^bootstrap.servers=' "$work/mock.out" 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 100 ] || { echo "mock cluster did not start" >&2; exit 1; }
    sleep 0.1
done
bootstrap=$(sed -n 's/^bootstrap.servers=//p' "$work/mock.out")
echo "   bootstrap.servers=$bootstrap"

echo
echo "== delivery service: 200 deliveries; every state change and its event in one transaction,"
echo "   published by the relay inside the service as each transaction commits"
"$build/examples/delivery_service" --db "$work/delivery.db" --deliveries 200 \
    --bootstrap "$bootstrap" --latency

echo
echo "== reading delivery.events back from Kafka (first 12 records, then the order check)"
"$tool" tail --bootstrap "$bootstrap" --topic delivery.events --exit-at-end --print 12
