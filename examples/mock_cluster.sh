# SPDX-License-Identifier: MIT
# Sourced by the demos (demo.sh, demo_pg.sh): starts an embedded Kafka,
# librdkafka's mock cluster in `deliveryevents mock-cluster`, with 3
# brokers and the topic delivery.events (6 partitions).  It lives as
# long as file descriptor 3 stays open (the demos' cleanup closes it and
# waits for mock_pid).  Sets mock_pid and bootstrap.
# Usage: start_mock_cluster TOOL WORK_DIR
start_mock_cluster() {
    mkfifo "$2/mock.in"
    "$1" mock-cluster --brokers 3 --topic delivery.events:6 --until-stdin-eof \
        < "$2/mock.in" > "$2/mock.out" &
    mock_pid=$!
    exec 3> "$2/mock.in"
    # It prints its address once it listens.
    i=0
    until grep -q '^bootstrap.servers=' "$2/mock.out" 2>/dev/null; do
        i=$((i + 1))
        [ $i -lt 100 ] || { echo "mock cluster did not start" >&2; exit 1; }
        sleep 0.1
    done
    bootstrap=$(sed -n 's/^bootstrap.servers=//p' "$2/mock.out")
}
