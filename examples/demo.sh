#!/bin/sh
# SPDX-License-Identifier: MIT
# The demo behind `make demo`: runs the delivery service on a fresh
# database in a scratch directory and shows what it recorded.
# Usage: demo.sh BUILD_DIR
set -eu
build=${1:?usage: demo.sh BUILD_DIR}
work=$(mktemp -d "${TMPDIR:-/tmp}/de-demo-XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

echo "== delivery service: 40 deliveries, every state change recorded in its own transaction"
"$build/examples/delivery_service" --db "$work/delivery.db" --deliveries 40
